"""DDP: two CPU processes (gloo, torchrun) give the single-process result for the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.students.artifact import read_meta
from helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parents[2]


def run(args, out_dir, batch_size):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, *args, "--out-dir", str(out_dir), "-o", f"data.batch_size={batch_size}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_two_gloo_processes_match_single_process(tmp_path, demo_root):
    # LayerNorm models: per-rank BatchNorm statistics would legitimately differ from one big batch
    cfg = tiny_config(tmp_path, demo_root, "run", schedule=dict(epochs=1), student=dict(arch="timm:test_convnext"),
                      teacher=dict(models=["timm:test_convnext"], bn="eval"),
                      loss=dict(kind="ssld", hard_weight=0.5), optim=dict(name="sgd", lr=0.2, base_batch=8))
    config = write_config(tmp_path, cfg)
    run(["-m", "distill.ssld", "-c", config], tmp_path / "single", batch_size=8)
    log = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "distill.ssld", "-c", config], tmp_path / "ddp", batch_size=8)  # global
    assert "2 process(es)" in log
    single = load_file(tmp_path / "single" / "run.safetensors")
    ddp = load_file(tmp_path / "ddp" / "run.safetensors")
    for k in single:
        assert torch.allclose(single[k], ddp[k], atol=1e-5, rtol=1e-4), k
    # evaluation counted every val image once across ranks
    s_meta, d_meta = read_meta(tmp_path / "single" / "run.safetensors"), read_meta(tmp_path / "ddp" / "run.safetensors")
    assert s_meta["pretrain"]["batch_size"] == d_meta["pretrain"]["batch_size"] == 8
    for key in ("top1", "top5", "top1_test_res"):
        assert abs(s_meta["pretrain"][key] - d_meta["pretrain"][key]) < 1e-6
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()
    assert len(rows) > 2
