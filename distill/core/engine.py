"""The one training loop under distill.ssld, transfer.finetune and detection.train.

A trainer builds a `Task` (its model, optimizer, scheduler, batches, forward pass and evaluation); the
engine runs it and owns everything around the step, once:

- the loop: epochs of `steps_per_epoch` batches (detection: one epoch of N iterations); a batch is
  `(..., skipped)`, its last element the unreadable images its loader dropped, which are counted;
- precision (`Precision`: autocast, GradScaler only for fp16, clipping) and DDP (`wrap_ddp`);
- after each step, by period: a log row (`run.log_period`, the one cross-rank sync), an evaluation
  (`run.eval_period`, and every `task.eval_every_epochs` epochs and at the end), a checkpoint
  (`run.checkpoint_period` iterations or `run.checkpoint_minutes`, and at every epoch end);
- checkpoints (atomic) holding the model, optimizer, scheduler, scaler, data position and every rank's
  RNG, and the resume policy (`open_run`: rerun resumes, `--restart` discards, a changed config is
  refused except the task's `safe_on_resume` keys, which take effect);
- the non-finite-loss guard: a flag accumulated on the device, summed across ranks only at log periods
  and before checkpoints (no per-step sync), ending in one line that names the last good checkpoint and
  the task's own advice (`task.advice`: keys its schema has, each safe to change on resume).
"""
from __future__ import annotations

import abc
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .atomic import remove_stale_temporaries_in
from .checkpoint import capture_rng, open_run, restore_rng, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, gather_objects, unwrap, wrap_ddp
from .errors import UserError
from .precision import Precision
from .progress import Progress
from .runlog import RunLog
from .trainer_kit import RUN_SAFE_ON_RESUME

CHECKPOINT = "checkpoint.pt"
WARN_SKIPPED = 5  # unreadable images named on the console; the rest are only counted
# What the non-finite stop may advise, by config key; a task lists the keys its schema has.
ADVICE = {"optim.lr": "lower optim.lr", "optim.clip_grad_norm": "set optim.clip_grad_norm (e.g. 1.0)",
          "run.amp": "use run.amp=bf16 instead of fp16"}


class NonFiniteLoss(UserError):
    pass


@dataclass
class StepOutput:
    """What a task's forward pass gives the engine: the loss to backpropagate, detached parts to log, and
    the number of images this rank trained on."""
    loss: torch.Tensor
    parts: dict
    images: int


@dataclass
class TrainState:
    epoch: int = 0            # the epoch in progress (== epochs when training is over)
    batch: int = 0            # batches of that epoch already consumed
    iteration: int = 0        # batches consumed since the start (one scheduler step each)
    results: list = field(default_factory=list)   # evaluation rows
    skipped: int = 0          # unreadable images skipped on this rank


class Task(abc.ABC):
    """The contract between a trainer and the engine.

    Attributes the trainer's build step sets:
      model             the unwrapped model, on its device (the engine wraps it for DDP / torch.compile)
      optimizer         its param groups' `initial_lr` are the configured learning rates
      scheduler         a LambdaLR stepped once per batch (`distill.core.trainer_kit.lr_scheduler`)
      epochs, steps_per_epoch, global_batch
    Class attributes a trainer may override:
      safe_on_resume    config keys that may change on resume and take effect
      advice            keys the non-finite stop advises (each in the schema and in safe_on_resume)
      clip_grad_norm, eval_every_epochs, min_batch
    """
    safe_on_resume: tuple = RUN_SAFE_ON_RESUME
    advice: tuple = ("optim.lr",)
    clip_grad_norm = 0.0
    eval_every_epochs = 1   # also evaluate at these epoch ends, and always at the end of training
    min_batch = 1   # fewer readable images than this: the step is skipped (BatchNorm needs 2)

    @abc.abstractmethod
    def batches(self, epoch: int, start: int):
        """An iterable of this epoch's batches from batch `start` on (resume)."""

    @abc.abstractmethod
    def forward(self, net: nn.Module, batch, state: TrainState) -> StepOutput:
        """The loss of one batch (the engine steps the optimizer)."""

    @abc.abstractmethod
    def evaluate(self, net: nn.Module) -> dict:
        """{metric: number} over this rank's shard, reduced over ranks."""

    def train_mode(self, net: nn.Module) -> None:
        net.train()

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class Engine:
    """Run a task to the end, resuming from OUT/checkpoint.pt per the resume policy. `run()` -> TrainState.

    `cfg` is the trainer's whole Config: its `run` block drives the engine, and all of it is what a resume
    compares with the checkpoint's."""

    def __init__(self, task: Task, cfg, dist: DistInfo, *, restart: bool = False,
                 checkpoint_name: str = CHECKPOINT, say=None):
        unsafe = [k for k in (*task.advice, "run.amp") if k not in task.safe_on_resume]
        assert not unsafe, f"advice the resume policy would refuse: {unsafe} are not in task.safe_on_resume"
        self.task, self.cfg, self.dist = task, cfg.run, dist
        self.config = cfg.to_dict()
        self.out = Path(self.cfg.out_dir)
        self.ckpt_path = self.out / checkpoint_name
        self.precision = Precision(self.cfg.amp, dist.device)
        self.state = TrainState()
        self.say = say or (lambda text: print(text, file=sys.stderr) if dist.is_main else None)
        if self.cfg.channels_last:
            task.model.to(memory_format=torch.channels_last)
        self.net = wrap_ddp(task.model, dist)
        if self.cfg.compile:
            self.net = torch.compile(self.net)
        if dist.is_main and self.out.is_dir():  # a target never written again keeps no killed writer's temporary
            remove_stale_temporaries_in(self.out)
        ckpt = open_run(self.ckpt_path, self.config, restart, task.safe_on_resume, dist.is_main)
        self.resumed = ckpt is not None
        if ckpt is not None:
            self._load(ckpt)
        self.log = RunLog(self.out, enabled=dist.is_main, resume_step=self.state.iteration if ckpt else None)
        self._bad = torch.zeros((), device=dist.device)
        self._ckpt_time = time.monotonic()

    # --- resume ---------------------------------------------------------------------------------------

    def _load(self, ckpt: dict) -> None:
        task = self.task
        ranks = ckpt["rng"]
        if len(ranks) != self.dist.world_size:
            raise UserError(f"{self.ckpt_path} was written by {len(ranks)} process(es); resume it with as many "
                            f"(now {self.dist.world_size}) so every rank continues its own random stream, "
                            "or pass --restart")
        fresh_lrs = [g["initial_lr"] for g in task.optimizer.param_groups]
        unwrap(self.net).load_state_dict(ckpt["model"])
        task.optimizer.load_state_dict(ckpt["optimizer"])
        task.scheduler.load_state_dict(ckpt["scheduler"])
        self.precision.load_state_dict(ckpt.get("precision", {}))
        apply_current_schedule(task.optimizer, task.scheduler, fresh_lrs)
        restore_rng(ranks[self.dist.rank])
        saved = ckpt["engine"]
        # The position follows from the iteration (one per batch), so a changed epoch/iteration count resumes
        # right: a finished 2-iteration detection run asked for 4 continues at iteration 2 of its one epoch.
        epoch, batch = divmod(saved["iteration"], task.steps_per_epoch)
        self.state = TrainState(epoch, batch, saved["iteration"], list(saved["results"]),
                                saved["skipped"][self.dist.rank])
        task.load_extra_state(ckpt.get("extra", {}))
        changed = ckpt.get("changed", {})
        self.say(f"resumed from {self.ckpt_path}: epoch {self.state.epoch + 1}, iteration {self.state.batch} "
                 f"of it (step {self.state.iteration})"
                 + ("; now " + ", ".join(f"{k} {b!r} (was {a!r})" for k, (a, b) in changed.items()) if changed else ""))

    def save(self) -> None:
        """Every rank joins (its RNG state is gathered); rank 0 writes, after the non-finite check."""
        self.check_finite()
        state = asdict(self.state)
        state["skipped"] = gather_objects(self.state.skipped)
        rngs = gather_objects(capture_rng())
        self._ckpt_time = time.monotonic()
        if not self.dist.is_main:
            return
        save_checkpoint(self.ckpt_path, dict(
            model=unwrap(self.net).state_dict(), optimizer=self.task.optimizer.state_dict(),
            scheduler=self.task.scheduler.state_dict(), precision=self.precision.state_dict(),
            engine=state, rng=rngs, config=self.config, extra=self.task.extra_state()))

    def skipped_total(self) -> int:
        """Unreadable images skipped in training, summed over the ranks (every rank must call it)."""
        return sum(gather_objects(self.state.skipped))

    # --- the non-finite guard -------------------------------------------------------------------------

    def check_finite(self) -> None:
        bad = all_reduce_sum(self._bad.clone().reshape(1))
        if float(bad) > 0:
            self._raise_non_finite()

    def _raise_non_finite(self):
        s = self.state
        last = f"the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.is_file() else \
            "no checkpoint was written yet"
        keys = [k for k in self.task.advice if k != "run.amp"] + (["run.amp"] if self.cfg.amp == "fp16" else [])
        advice = ", ".join(ADVICE[k] for k in keys[:-1]) + (" or " if len(keys) > 1 else "") + ADVICE[keys[-1]]
        raise NonFiniteLoss(f"loss became NaN or inf in epoch {s.epoch + 1} before iteration {s.batch} "
                            f"(step {s.iteration}); stopped, {last}. {advice[0].upper() + advice[1:]} "
                            f"with -o KEY=VALUE, then rerun the command: it "
                            f"{'resumes from that checkpoint and ' if self.ckpt_path.is_file() else ''}"
                            f"takes the new value{'s' if len(keys) > 1 else ''}")

    # --- the loop -------------------------------------------------------------------------------------

    def run(self) -> TrainState:
        task, s = self.task, self.state
        for epoch in range(s.epoch, task.epochs):
            if s.batch < task.steps_per_epoch:
                self.train_epoch(epoch)
            s.epoch, s.batch = epoch + 1, 0
            if task.eval_every_epochs and (epoch + 1) % task.eval_every_epochs == 0 or epoch + 1 == task.epochs:
                self.evaluate()
            self.save()
        if not s.results or s.results[-1]["iteration"] != s.iteration:
            self.evaluate()   # a run resumed after its last epoch, or eval periods that miss the end
        self.log.close()
        return s

    def evaluate(self) -> dict:
        metrics = self.task.evaluate(self.net)
        row = dict(epoch=self.state.epoch, iteration=self.state.iteration, **metrics)
        self.state.results.append(row)
        self.log.log(self.state.iteration, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        self.say(f"step {self.state.iteration}: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        self.task.train_mode(self.net)
        return row

    def train_epoch(self, epoch: int) -> None:
        """One epoch's steps from the current position (benchmarks call it alone: no eval, no epoch-end save)."""
        task, s, dist = self.task, self.state, self.dist
        task.train_mode(self.net)
        desc = f"epoch {epoch + 1}/{task.epochs}" if task.epochs > 1 else "train"
        bar = Progress(task.steps_per_epoch * task.global_batch, desc, enabled=dist.is_main and self.cfg.progress,
                       initial=s.batch * task.global_batch)
        window = _Window()
        for batch in task.batches(epoch, s.batch):
            *_, skipped = batch
            self._count_skipped(skipped, bar)
            out = None
            if len(batch[0]) >= task.min_batch:
                with self.precision.autocast():
                    out = task.forward(self.net, batch, s)
                self.precision.step(out.loss, task.optimizer, task.clip_grad_norm)
                self._bad += (~torch.isfinite(out.loss.detach())).float()
                window.add(out)
            elif dist.distributed:
                raise UserError("a whole batch of training images was unreadable on one rank; the ranks cannot "
                                "stay in step. Check the data (the warnings above name the files)")
            task.scheduler.step()
            s.batch += 1
            s.iteration += 1
            bar.update((out.images if out else 0) * dist.world_size)
            last = s.batch == task.steps_per_epoch
            window = self._after_step(window, epoch, bar, last)
            if last:
                break  # an endless sampler (detection) ends here too
        bar.close()

    def _after_step(self, window: "_Window", epoch: int, bar: Progress, last: bool) -> "_Window":
        """What is due after a step, by period: a log row (which also reads the checkpoint clock), then an
        evaluation, then a checkpoint. The epoch's end (evaluation, checkpoint) is `run`'s. Returns the
        window the next steps add to."""
        s, cfg = self.state, self.cfg
        due_by_time = False
        if s.iteration % cfg.log_period == 0 or last:
            due_by_time = self._log(window, epoch, bar)
            window = _Window()
        if not last:
            if cfg.eval_period and s.iteration % cfg.eval_period == 0:
                self.evaluate()
            if cfg.checkpoint_period and s.iteration % cfg.checkpoint_period == 0 or due_by_time:
                self.save()
        return window

    def _count_skipped(self, skipped, bar) -> None:
        if not skipped:
            return
        for item in skipped[:max(0, WARN_SKIPPED - self.state.skipped)]:
            bar.write(f"warning: skipped unreadable image {getattr(item, 'reason', item)}")
        self.state.skipped += len(skipped)

    def _log(self, window: "_Window", epoch: int, bar: Progress) -> bool:
        """Reduce the window across ranks (the one sync of a log period), check finiteness, write a row.
        Returns whether a time-based checkpoint is due (rank 0's clock decides for every rank)."""
        dist, s = self.dist, self.state
        names = sorted(window.sums)
        due = float(self.cfg.checkpoint_minutes > 0 and
                    time.monotonic() - self._ckpt_time >= 60 * self.cfg.checkpoint_minutes and dist.is_main)
        values = [self._bad.reshape(()), *(window.sums[k] for k in names)]
        stats = torch.stack([v.float().to(dist.device) for v in values] + [
            torch.tensor(float(x), device=dist.device) for x in (window.steps, window.images, s.skipped, due)])
        stats = all_reduce_sum(stats).tolist()
        if stats[0] > 0:
            self._raise_non_finite()
        steps, images, skipped, due = stats[-4:]
        means = {k: v / max(steps, 1) for k, v in zip(names, stats[1:1 + len(names)])}
        group = self.task.optimizer.param_groups[0]
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        base_lr = group["lr"] / group["lr_mult"] if group.get("lr_mult") else group["lr"]
        row = dict(means, lr=base_lr, epoch=epoch + s.batch / self.task.steps_per_epoch, img_per_s=images / elapsed,
                   skipped_images=skipped)
        self.log.log(s.iteration, **row)
        if "loss" in means:
            bar.update(0, loss=means["loss"], lr=row["lr"])
        return due > 0


class _Window:
    """Sums of the logged parts over one log period, kept on the device (no sync until the log step)."""

    def __init__(self):
        self.sums, self.steps, self.images, self.start = {}, 0, 0, time.perf_counter()

    def add(self, out: StepOutput) -> None:
        parts = {"loss": out.loss.detach(), **out.parts}
        for k, v in parts.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1
        self.images += out.images


def apply_current_schedule(optimizer, scheduler, initial_lrs) -> None:
    """Make the freshly built learning rates (a changed optim.lr) and schedule (changed epochs) govern a
    resumed optimizer: LambdaLR's state keeps the old base lrs, the lambdas are rebuilt from the config."""
    for group, lr in zip(optimizer.param_groups, initial_lrs):
        group["initial_lr"] = lr
    scheduler.base_lrs = list(initial_lrs)
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, lr, factor in zip(optimizer.param_groups, initial_lrs, factors):
        group["lr"] = lr * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
