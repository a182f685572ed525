"""The engine driven by a stand-in task (a three-parameter model on tensors), without any trainer: exact
resume mid-epoch, a changed safe key taking effect, the non-finite stop naming the last good checkpoint,
and the evaluation and checkpoint periods."""
import pytest
import torch
import torch.nn as nn

from distill.core.config import Config
from distill.core.distributed import DistInfo
from distill.core.engine import Engine, NonFiniteLoss, StepOutput, Task
from distill.core.errors import UserError
from distill.core.trainer_kit import RUN_DEFAULTS, RUN_SAFE_ON_RESUME, lr_scheduler

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
STEPS, EPOCHS = 5, 2


class Interrupt(Exception):
    pass


class LineTask(Task):
    """Fit y = 2x + 1 with noise drawn from the global RNG in every step (so resume must restore the RNG),
    and a data order from (epoch, position) (so resume must restore the position)."""
    safe_on_resume = RUN_SAFE_ON_RESUME + ("optim.lr",)
    advice = ("optim.lr",)

    def __init__(self, cfg, nan_at=None, stop_at=None):
        torch.manual_seed(0)
        self.model = nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.optim.lr, momentum=0.9)
        self.scheduler = lr_scheduler(self.optimizer, dict(kind="cosine", epochs=EPOCHS, warmup_epochs=0,
                                                           milestones=[], gamma=0.1, warmup_factor=0.0,
                                                           min_factor=0.0), STEPS)
        self.epochs, self.steps_per_epoch, self.global_batch = EPOCHS, STEPS, 4
        self.nan_at, self.stop_at = nan_at, stop_at

    def batches(self, epoch, start):
        for b in range(start, STEPS):
            x = torch.linspace(-1, 1, 4).view(4, 1) + 0.1 * (epoch * STEPS + b)
            yield x, 2 * x + 1, []

    def forward(self, net, batch, state):
        if state.iteration == self.stop_at:
            raise Interrupt
        x, y, _ = batch
        loss = ((net(x) - y - 0.01 * torch.randn_like(y)) ** 2).mean()
        if state.iteration == self.nan_at:
            loss = loss * float("nan")
        return StepOutput(loss, {}, len(x))

    def evaluate(self, net):
        with torch.no_grad():
            return {"error": float((net(torch.ones(1, 1)) - 3).abs())}


def config(out, lr=0.1, **run):
    return Config.wrap(dict(run=dict(RUN_DEFAULTS, out_dir=str(out), device="cpu", workers=0, progress=False,
                                     checkpoint_minutes=0.0, log_period=1, **run), optim=dict(lr=lr)))


def engine(out, task=None, restart=False, **kwargs):
    cfg = config(out, **kwargs)
    return Engine(task or LineTask(cfg), cfg, CPU, restart=restart, say=lambda text: None)


def weights(e):
    return {k: v.clone() for k, v in e.task.model.state_dict().items()}


def test_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path):
    whole = engine(tmp_path / "whole", checkpoint_period=3)
    whole.run()
    cfg = config(tmp_path / "cut", checkpoint_period=3)
    with pytest.raises(Interrupt):   # killed in epoch 2, after the checkpoint at iteration 6
        Engine(LineTask(cfg, stop_at=7), cfg, CPU, say=lambda text: None).run()
    resumed = engine(tmp_path / "cut", checkpoint_period=3)
    assert resumed.resumed and (resumed.state.epoch, resumed.state.batch, resumed.state.iteration) == (1, 1, 6)
    resumed.run()
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)     # bit-exact: position, optimizer, scheduler and RNG
    assert [r["error"] for r in resumed.state.results][-1] == whole.state.results[-1]["error"]


def test_a_changed_safe_key_takes_effect_and_another_change_is_refused(tmp_path):
    engine(tmp_path, lr=0.1, checkpoint_period=3).run()
    more = engine(tmp_path, lr=0.01, checkpoint_period=3)       # optim.lr is safe: it governs the resumed run
    assert more.resumed
    group = more.task.optimizer.param_groups[0]
    factor = more.task.scheduler.lr_lambdas[0](more.task.scheduler.last_epoch)
    assert group["initial_lr"] == 0.01 and group["lr"] == pytest.approx(0.01 * factor)
    with pytest.raises(UserError, match=r"another config \(run.seed: 0 -> 1"):
        engine(tmp_path, lr=0.01, checkpoint_period=3, seed=1)


def test_the_non_finite_stop_names_the_last_good_checkpoint_and_its_advice_works(tmp_path):
    cfg = config(tmp_path, checkpoint_period=3)
    task = LineTask(cfg, nan_at=7)
    with pytest.raises(NonFiniteLoss) as stop:
        Engine(task, cfg, CPU, say=lambda text: None).run()
    message = str(stop.value)
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.pt'}" in message
    assert "Lower optim.lr with -o KEY=VALUE, then rerun the command: it resumes from that checkpoint" in message
    resumed = engine(tmp_path, lr=0.05, checkpoint_period=3)  # the advice, applied as written
    assert resumed.state.iteration == 6                        # the checkpoint before the NaN
    state = resumed.run()
    assert state.iteration == EPOCHS * STEPS and all(torch.isfinite(v).all() for v in weights(resumed).values())


def test_evaluation_and_checkpoint_periods(tmp_path, monkeypatch):
    e = engine(tmp_path, eval_period=2, checkpoint_period=3)
    saved = []
    original = e.save
    monkeypatch.setattr(e, "save", lambda: (saved.append(e.state.iteration), original())[1])
    e.run()
    # eval: every 2 iterations inside an epoch, and at each epoch end (5, 10); checkpoints: every 3, and at
    # each epoch end; the last step of an epoch leaves both to the epoch's end
    assert [r["iteration"] for r in e.state.results] == [2, 4, 5, 6, 8, 10]
    assert saved == [3, 5, 6, 9, 10]


def test_advice_the_resume_policy_would_refuse_is_a_programming_error(tmp_path):
    class Careless(LineTask):
        advice = ("optim.lr", "optim.clip_grad_norm")   # not in safe_on_resume
    cfg = config(tmp_path)
    with pytest.raises(AssertionError, match="optim.clip_grad_norm"):
        Engine(Careless(cfg), cfg, CPU)
