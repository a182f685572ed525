"""Each trainer's own stops, as a user meets them on the command line:

- run into a non-finite loss, the one-line error advises keys its schema has; rerunning with exactly those
  keys (`-o KEY=VALUE`, as the message says) resumes from the named checkpoint and finishes;
- rerun into a run folder that has since become read-only, one line (a text path, not a bytes repr) and
  no traceback, TensorBoard's writer thread included.
"""
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distill.core.checkpoint import flat_keys
from helpers import tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
HUGE_LR = "1e30"   # one step at this rate overflows the weights: the next loss is inf or NaN
ADVISED = re.compile(r"\b((?:optim|run|schedule|data|model)\.[a-z_]+)\b")

# Each trainer: (argv of a short run, the arguments that continue it for longer at HUGE_LR). The first run
# ends with a good checkpoint; the continued one stops at its first step past it.


def ssld_argv(tmp_path, demo_root, out):
    cfg = tiny_config(tmp_path, demo_root, "ssld", schedule=dict(epochs=1, warmup_epochs=0.0),
                      run=dict(out_dir=str(out), device="cpu", workers=0, progress=False, log_period=1,
                               checkpoint_minutes=0.0))
    return ["distill.ssld", "-c", write_config(tmp_path, cfg, "ssld.yaml")], \
        ["-o", "schedule.epochs=2", "-o", "optim.lr=" + HUGE_LR]


def transfer_argv(tmp_path, demo_root, out):
    argv = ["transfer.finetune", "--dataset", f"folder:{demo_root}", "--backbone", "timm:test_resnet",
            "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress",
            "--out-dir", str(out), "-o", "schedule.warmup_epochs=0", "-o", "run.log_period=1",
            "-o", "run.checkpoint_minutes=0"]
    return argv, ["--epochs", "2", "--lr", HUGE_LR]   # flags: the advice's -o must win over them


def detection_argv(tmp_path, demo_root, out):
    val = demo_root / "annotations" / "instances_val.json"
    overrides = [f"data.train_json={val}", f"data.train_images={demo_root}", f"data.val_json={val}",
                 f"data.val_images={demo_root}", "model.fpn_channels=32", "model.box_head_dim=64",
                 "model.train_sizes=[64]", "model.test_size=64", "model.max_size=64", "model.roi_batch_per_image=32",
                 "model.rpn_post_nms_train=50", "model.rpn_post_nms_test=50", "run.workers=0", "data.batch_size=2",
                 "optim.base_batch=2", "schedule.iterations=2", "schedule.steps=[]", "schedule.warmup_iters=0",
                 "run.log_period=1", "run.checkpoint_period=0", "run.progress=false", "data.eval_batch_size=8"]
    argv = ["detection.train", "-c", str(ROOT / "configs" / "detection" / "demo.yaml"), "--out-dir", str(out)]
    return argv + [a for o in overrides for a in ("-o", o)], \
        ["-o", "schedule.iterations=4", "-o", "optim.lr=" + HUGE_LR]


TRAINERS = {"distill.ssld": ssld_argv, "transfer.finetune": transfer_argv, "detection.train": detection_argv}


def schema_keys(module: str) -> set[str]:
    if module == "transfer.finetune":
        from transfer.config import DEFAULTS
    elif module == "detection.train":
        from detection.config import DEFAULTS
    else:
        from distill.ssld import DEFAULTS
    return set(flat_keys(DEFAULTS))


def cli(argv, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *argv, *extra], capture_output=True, text=True, env=env,
                          timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("module", TRAINERS)
def test_following_the_non_finite_advice_as_written_resumes_and_finishes(module, tmp_path, demo_root):
    out = tmp_path / "run"
    argv, longer = TRAINERS[module](tmp_path, demo_root, out)
    assert cli(argv).returncode == 0
    stopped = cli(argv, *longer)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    [line] = error_lines(stopped.stderr)
    assert "loss became NaN or inf" in line and f"the last good checkpoint is {out / 'checkpoint.pt'}" in line
    advice = line.split("checkpoint.pt.", 1)[1]
    keys = ADVISED.findall(advice)
    assert keys and set(keys) <= schema_keys(module), (keys, advice)   # only keys this trainer's schema has
    values = {"optim.lr": "0.005", "optim.clip_grad_norm": "1.0", "run.amp": "bf16"}
    rerun = cli(argv, *longer, *[a for k in keys for a in ("-o", f"{k}={values[k]}")])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from {out / 'checkpoint.pt'}" in rerun.stderr and "optim.lr 0.005 (was" in rerun.stderr


@contextlib.contextmanager
def folder_made_read_only_later(tmp_path):
    """A folder that is writable now and read-only when `freeze()` is called. Root ignores permission bits
    (CI runs as root), so as root it is a tmpfs remounted read-only; otherwise chmod."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    if os.geteuid() != 0:
        def freeze():
            for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
                path.chmod(path.stat().st_mode & ~0o222)
        try:
            yield folder, freeze
        finally:
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a tmpfs: cannot make a read-only folder")
    try:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("module", TRAINERS)
def test_rerun_into_a_folder_that_became_read_only_is_one_line(module, tmp_path, demo_root):
    with folder_made_read_only_later(tmp_path) as (folder, freeze):
        argv, _ = TRAINERS[module](tmp_path, demo_root, folder / "run")
        first = cli(argv)
        assert first.returncode == 0, first.stderr[-2000:]
        freeze()
        rerun = cli(argv)
    assert rerun.returncode == 2, rerun.stderr[-2000:]
    assert "Traceback" not in rerun.stderr and "Exception in thread" not in rerun.stderr, rerun.stderr[-2000:]
    [line] = error_lines(rerun.stderr)
    assert f"cannot write {folder / 'run'}" in line and "b'" not in line
