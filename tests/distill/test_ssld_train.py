"""The trainer end to end on tiny demo data: teacher from labels, distillation, export, logs, errors."""
import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from helpers import tiny_config, write_config
from distill import ssld
from distill.students.artifact import load_student
from distill.core.checkpoint import load_checkpoint
from distill.core.errors import run_cli
from distill.losses import DistillLoss
from distill.students.stages import param_stages


@pytest.fixture(scope="module")
def teacher_artifact(tmp_path_factory, demo_root):
    tmp = tmp_path_factory.mktemp("teacher")
    ssld.main(["-c", write_config(tmp, tiny_config(tmp, demo_root, "teacher", schedule=dict(epochs=3)))])
    return tmp / "teacher" / "teacher.safetensors"


def test_teacher_less_ce_run_exports_an_artifact_with_recipe_and_results(teacher_artifact):
    model, meta = load_student(teacher_artifact)
    out = teacher_artifact.parent
    assert meta["arch"] == "test_resnet" and meta["num_classes"] == 4
    pre = meta["pretrain"]
    assert pre["loss"]["kind"] == "ce" and pre["teacher"] is None and pre["epochs"] == 3
    assert pre["weight_decay"] == 1e-4 and pre["data"] == [{"type": "folder", "path": "train"}]
    assert 0 <= pre["top1"] <= 100 and pre["top1_test_res"] is not None and pre["top5"] >= pre["top1"]
    assert meta["preprocessing"]["input_size"] == 32 and meta["preprocessing"]["test_input_size"] == 40
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for column in ("step", "loss", "lr", "img_per_s", "top1", "top5", "top1_test_res"):
        assert column in header
    assert (out / "curves.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())


def test_ssld_distills_from_an_artifact_with_unlabeled_images_and_skips_corrupt(tmp_path, demo_root,
                                                                             teacher_artifact, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "train", data / "train")
    bad = sorted((data / "train").rglob("*.jpg"))[0]
    bad.write_bytes(b"\xff\xd8 broken")
    pool = tmp_path / "pool.txt"
    pool.write_text("".join(f"{p}\n" for p in sorted((demo_root / "val").rglob("*.jpg"))))  # label-free lines
    cfg = tiny_config(tmp_path, demo_root, "student", loss=dict(kind="ssld"),
                      teacher=dict(models=[str(teacher_artifact)], input_size=40),
                      data=dict(train=[dict(type="folder", path=str(data / "train"), weight=3),
                                       dict(type="list", path=str(pool), weight=1)], epoch_samples=48))
    ssld.main(["-c", write_config(tmp_path, cfg)])
    err = capsys.readouterr().err
    assert f"skipped unreadable image {bad}" in err
    _, meta = load_student(tmp_path / "student" / "student.safetensors")
    pre = meta["pretrain"]
    assert pre["teacher"] == [str(teacher_artifact)] and pre["loss"]["kind"] == "ssld"
    assert pre["skipped_images"] >= 1
    assert "loss_ssld" in (tmp_path / "student" / "metrics.csv").read_text().splitlines()[0]


def test_adamw_bf16_channels_last_clip_and_multipliers_run(tmp_path, demo_root):
    cfg = tiny_config(tmp_path, demo_root, "fancy", schedule=dict(epochs=1),
                      run=dict(amp="bf16", channels_last=True, device="cpu", workers=0, progress=False),
                      optim=dict(name="adamw", lr=1e-3, weight_decay=0.05, clip_grad_norm=1.0, base_batch=4),
                      student=dict(arch="timm:test_resnet", multipliers=[0, 0.5, 0.5, 1, 1]),
                      data=dict(function_matching=True, augment="inception"), eval=dict(test_resolution=False))
    task = ssld.run(ssld.check(ssld.load_config(write_config(tmp_path, cfg), [], ssld.DEFAULTS)),
                    ssld.init_distributed("cpu")).task
    opt = task.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == pytest.approx(2e-3)  # linear scaling: global batch 8 / base 4
    mults = {g["lr_mult"] for g in opt.param_groups}
    assert mults == {0.5, 1.0}
    stages = param_stages(task.model, "generic")
    stem = [p for n, p in task.model.named_parameters() if stages[n] == 0]
    assert stem and not any(p.requires_grad for p in stem)


def test_lr_follows_per_iteration_warmup_then_cosine(tmp_path, demo_root):
    cfg = tiny_config(tmp_path, demo_root, "lr", schedule=dict(epochs=2, kind="cosine", warmup_epochs=1.0))
    engine = ssld.run(ssld.check(ssld.load_config(write_config(tmp_path, cfg), [], ssld.DEFAULTS)),
                      ssld.init_distributed("cpu"))
    rows = [r for r in csv_rows(tmp_path / "lr" / "metrics.csv") if not math.isnan(r["lr"])]
    lr = {int(r["step"]): r["lr"] for r in rows}
    # 6 it/epoch, warmup 6 its from 0, then cosine to 0 at step 12; logged lr is for the next step
    assert lr[2] == pytest.approx(0.05 * 2 / 6) and lr[4] == pytest.approx(0.05 * 4 / 6)
    assert lr[8] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 6)))
    assert engine.task.scheduler.last_epoch == 12


def csv_rows(path):
    from distill.core.runlog import read_metrics
    return read_metrics(path)


def test_missing_data_path_is_one_clear_line_before_training(tmp_path, demo_root, capsys):
    cfg = tiny_config(tmp_path, demo_root, data=dict(train=[dict(type="list", path="no_such_list.txt")]))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ssld.main, ["-c", write_config(tmp_path, cfg)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: list file not found:") and "no_such_list.txt" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section, message", [
    (dict(loss=dict(kind="ssld")), "needs a teacher"),
    (dict(run=dict(amp="fp8")), "run.amp='fp8'; expected one of off | bf16 | fp16"),
    (dict(run=dict(workers=-1)), "run.workers=-1: expected a number >= 0"),
    (dict(optim=dict(lr=-1)), "optim.lr=-1.0: expected a number >= 0"),
    (dict(data=dict(input_size=-5)), "data.input_size=-5: expected a number >= 8"),
    (dict(data=dict(crop_scale=[0.5])), "data.crop_scale=[0.5]: expected [low, high]"),
    (dict(loss=dict(kind="ssld"), teacher=dict(models=["timm:test_resnet"], input_size=-3)),
     "teacher.input_size=-3: expected a number >= 8"),
    (dict(optim=dict(nme="sgd")), "did you mean 'optim.name'"),
])
def test_bad_config_is_a_clear_error(tmp_path, demo_root, capsys, section, message):
    with pytest.raises(SystemExit):
        run_cli(ssld.main, ["-c", write_config(tmp_path, tiny_config(tmp_path, demo_root, **section))])
    assert message in capsys.readouterr().err


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, demo_root, monkeypatch):
    calls = {"n": 0}
    real_call = DistillLoss.__call__

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        total, parts = real_call(self, *args, **kwargs)
        return (total * float("nan") if calls["n"] == 5 else total), parts

    monkeypatch.setattr(DistillLoss, "__call__", poisoned)
    cfg = tiny_config(tmp_path, demo_root, "nan", run=dict(checkpoint_period=2, checkpoint_minutes=0.0,
                                                                  device="cpu", workers=0, log_period=2, progress=False))
    with pytest.raises(ssld.NonFiniteLoss, match=r"NaN or inf .* last good checkpoint is .*checkpoint.pt"):
        ssld.main(["-c", write_config(tmp_path, cfg)])
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert ckpt["engine"]["iteration"] == 4 and ckpt["engine"]["batch"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "nan.safetensors").exists()


def test_exported_artifact_metadata_is_json_under_ssld_key(teacher_artifact):
    with safe_open(str(teacher_artifact), framework="pt") as f:
        meta = json.loads(f.metadata()["ssld"])
    assert meta["name"] == "teacher" and meta["stages"]["family"] == "generic"


def test_compile_option_wraps_the_student_and_exports_unwrapped_weights(tmp_path, demo_root, monkeypatch):
    """torch.compile itself takes minutes on a CPU: a stand-in with the same `_orig_mod` shape checks the wiring."""
    compiled = []

    class FakeCompiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, x):
            return self._orig_mod(x)

    def fake_compile(model, **kwargs):
        compiled.append(model)
        return FakeCompiled(model)

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = tiny_config(tmp_path, demo_root, "compiled", schedule=dict(epochs=1),
                      run=dict(compile=True, checkpoint_period=3, checkpoint_minutes=0.0, device="cpu", workers=0,
                               progress=False))
    ssld.main(["-c", write_config(tmp_path, cfg)])
    assert len(compiled) == 1
    load_student(tmp_path / "compiled" / "compiled.safetensors")  # keys without the wrapper's prefix
    assert not any(k.startswith("_orig_mod") for k in load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"])


def test_ssld_runs_on_label_free_images_only(tmp_path, demo_root, teacher_artifact):
    pool = tmp_path / "pool.txt"
    pool.write_text("".join(f"{p}\n" for p in sorted((demo_root / "train").rglob("*.jpg"))))  # no labels at all
    cfg = tiny_config(tmp_path, demo_root, "label_free", schedule=dict(epochs=1), loss=dict(kind="ssld"),
                      teacher=dict(models=[str(teacher_artifact)]), data=dict(train=[dict(type="list", path=str(pool))]))
    ssld.main(["-c", write_config(tmp_path, cfg)])
    header = (tmp_path / "label_free" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "loss_ssld" in header and "loss_ce" not in header
    with pytest.raises(ssld.UserError, match="no train source has any"):
        cfg = tiny_config(tmp_path, demo_root, "needs_labels", loss=dict(kind="ssld", hard_weight=1.0),
                          teacher=dict(models=[str(teacher_artifact)]),
                          data=dict(train=[dict(type="list", path=str(pool))]))
        ssld.main(["-c", write_config(tmp_path, cfg)])


@pytest.mark.parametrize("amp", [None, "fp16"])
def test_distill_step_clips_the_global_gradient_norm(amp):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    precision = ssld.Precision(amp, "cpu")
    if precision.scaler is not None:
        precision.scaler = torch.amp.GradScaler("cpu", init_scale=64.0)  # no overflow: a real step
    images, labels = torch.randn(4, 3, 8, 8) * 10, torch.tensor([0, 1, 2, 3])
    ssld.distill_step(model, None, DistillLoss("ce"), images, labels, opt, precision, clip_grad_norm=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)


def test_resume_takes_a_new_learning_rate_and_more_epochs(tmp_path, demo_root):
    """The NaN advice ("lower optim.lr, then rerun") must work: optimizer and scheduler take the new lr."""
    cfg = tiny_config(tmp_path, demo_root, "lr_change", schedule=dict(epochs=1, kind="cosine", warmup_epochs=0.0))
    ssld.main(["-c", write_config(tmp_path, cfg)])
    cfg["optim"]["lr"], cfg["schedule"]["epochs"] = 0.01, 2
    engine = ssld.main(["-c", write_config(tmp_path, cfg)])
    groups = engine.task.optimizer.param_groups
    assert all(g["initial_lr"] == pytest.approx(0.01 * g["lr_mult"]) for g in groups)
    rows = {int(r["step"]): r["lr"] for r in csv_rows(tmp_path / "lr_change" / "metrics.csv") if not math.isnan(r["lr"])}
    # 6 it/epoch, now 12 in all: step 8 of the new cosine at the new base lr
    assert rows[8] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 8 / 12)))
    assert rows[4] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))  # the first run's rows stay
    assert engine.task.scheduler.last_epoch == 12
    with pytest.raises(ssld.UserError, match=r"another config \(optim.momentum: 0.9 -> 0.5"):
        cfg["optim"]["momentum"] = 0.5
        ssld.main(["-c", write_config(tmp_path, cfg)])


def test_an_empty_or_extra_class_folder_is_refused_not_a_label_shift(tmp_path, demo_root, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "train", data / "train")
    shutil.copytree(demo_root / "val", data / "val")
    (data / "train" / "aaa_empty").mkdir()   # sorts first: every train label would move up by one
    cfg = tiny_config(tmp_path, data)
    with pytest.raises(SystemExit):
        run_cli(ssld.main, ["-c", write_config(tmp_path, cfg)])
    err = capsys.readouterr().err
    assert "class folders differ" in err and "only in" in err and "aaa_empty" in err and len(err.splitlines()) == 1
