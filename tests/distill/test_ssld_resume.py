"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends with the uninterrupted run's weights."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.core.checkpoint import load_checkpoint
from distill.core.runlog import read_metrics
from helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parents[2]


def trainer(config, *extra, out_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "distill.ssld", "-c", config, "--out-dir", str(out_dir), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, demo_root):
    # distillation with mixup, dropout and drop_path: data order, mixup lambda and the RNG all resume exactly
    cfg = tiny_config(tmp_path, demo_root, "run", schedule=dict(epochs=3), loss=dict(kind="ssld", hard_weight=0.3),
                      teacher=dict(models=["timm:test_resnet"], bn="train"),
                      student=dict(arch="timm:test_resnet", drop_rate=0.3, drop_path_rate=0.2),
                      data=dict(function_matching=True), optim=dict(name="sgd", lr=0.05, base_batch=8, weight_decay=1e-4),
                      run=dict(checkpoint_period=2, checkpoint_minutes=0.0, device="cpu", workers=0, log_period=2,
                               progress=False))
    config = write_config(tmp_path, cfg)
    reference = trainer(config, out_dir=tmp_path / "ref")

    killed_dir = tmp_path / "killed"
    proc = trainer(config, out_dir=killed_dir)
    ckpt = killed_dir / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(ckpt)["engine"]
    assert 0 < state["batch"] < 6 and state["iteration"] < 18, "the kill must land mid-run, mid-epoch"
    assert not (killed_dir / "run.safetensors").exists()

    log = finish(trainer(config, out_dir=killed_dir))  # the same command again resumes
    finish(reference)
    assert f"resumed from {ckpt}: epoch {state['epoch'] + 1}, iteration {state['batch']} of it " \
           f"(step {state['iteration']})" in log
    ref = load_file(tmp_path / "ref" / "run.safetensors")
    resumed = load_file(killed_dir / "run.safetensors")
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k
    # metrics logged after the last checkpoint, before the kill, are not duplicated
    steps = [r["step"] for r in read_metrics(killed_dir / "metrics.csv")]
    assert steps == [r["step"] for r in read_metrics(tmp_path / "ref" / "metrics.csv")]
