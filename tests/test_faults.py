"""Fault tests: every trainer (and mining) killed with SIGKILL during a checkpoint write and at random points,
then rerun with the same command until it finishes, ends bit for bit where an uninterrupted run ends.

Each run writes a checkpoint after every step, so a good share of the kill points land mid-write. The kill
times are drawn from a seeded generator over the reference run's own duration."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.core.checkpoint import load_checkpoint
from helpers import label_recipe, run_relabel, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
KILLS = 3


def start(cmd, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_to_end(cmd, log_path) -> float:
    with open(log_path, "ab") as log:
        t0 = time.monotonic()
        proc = start(cmd, log)
        assert proc.wait(timeout=300) == 0, Path(log_path).read_text()[-3000:]
    return time.monotonic() - t0


def kill_during_write(cmd, out_dir: Path, log) -> bool:
    """Start the command and SIGKILL it the moment an atomic-write temporary appears under out_dir.
    Returns whether the kill landed while the temporary existed (False: the run ended first)."""
    proc = start(cmd, log)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(".") and p.name.endswith(".tmp") for p in out_dir.rglob("*")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.wait()
    return False


def kill_and_resume(cmd, out_dir: Path, duration: float, seed: int) -> list[float]:
    """SIGKILL the command once mid-write and KILLS times at random moments, rerunning it each time; then
    let it finish. Returns the kill times (the mid-write one as -1)."""
    rng = random.Random(seed)
    log_path = out_dir.parent / f"{out_dir.name}.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    kills = []
    with open(log_path, "ab") as log:
        if kill_during_write(cmd, out_dir, log):
            kills.append(-1)
    for _ in range(KILLS):
        delay = rng.uniform(0.35, 0.95) * duration
        with open(log_path, "ab") as log:
            proc = start(cmd, log)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills.append(round(delay, 2))
    run_to_end(cmd, log_path)
    leftovers = [p.name for p in out_dir.rglob(".*.tmp")]
    assert not leftovers, f"stale temporary files after the final run: {leftovers}"
    print(f"{out_dir}: kills {kills}")
    return kills


def same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ssld_with_dropout_and_drop_path_survives_kills(tmp_path, demo_root):
    cfg = tiny_config(tmp_path, demo_root, "run", schedule=dict(epochs=2), loss=dict(kind="ssld", hard_weight=0.3),
                      teacher=dict(models=["timm:test_resnet"], bn="train"),
                      student=dict(arch="timm:test_resnet", drop_rate=0.2, drop_path_rate=0.1),
                      data=dict(function_matching=True),
                      run=dict(device="cpu", workers=1, checkpoint_period=1, checkpoint_minutes=0.0, log_period=2,
                               progress=False))
    config = write_config(tmp_path, cfg)
    cmd = lambda out: ["-m", "distill.ssld", "-c", config, "--out-dir", str(out)]  # noqa: E731
    duration = run_to_end(cmd(tmp_path / "ref"), tmp_path / "ref.log")
    kills = kill_and_resume(cmd(tmp_path / "cut"), tmp_path / "cut", duration, seed=1)
    assert -1 in kills, "the mid-write kill did not land"
    same_tensors(load_file(tmp_path / "ref" / "run.safetensors"), load_file(tmp_path / "cut" / "run.safetensors"))


def test_ssld_from_cached_labels_survives_kills(tmp_path, demo_root):
    """teacher.cache: the crops replayed from the label records and the stored labels resume exactly too."""
    config = label_recipe(tmp_path, demo_root, "train", student=dict(arch="timm:test_resnet", drop_rate=0.2),
                          run=dict(workers=1, checkpoint_period=1))
    run_relabel(config, tmp_path / "labels", "--k", "3", "--shard-batches", "2")
    cmd = lambda out: ["-m", "distill.ssld", "-c", config, "--out-dir", str(out),  # noqa: E731
                       "-o", f"teacher.cache={tmp_path / 'labels'}"]
    duration = run_to_end(cmd(tmp_path / "ref"), tmp_path / "ref.log")
    kills = kill_and_resume(cmd(tmp_path / "cut"), tmp_path / "cut", duration, seed=5)
    assert -1 in kills, "the mid-write kill did not land"
    same_tensors(load_file(tmp_path / "ref" / "run.safetensors"), load_file(tmp_path / "cut" / "run.safetensors"))


def test_transfer_survives_kills(tmp_path, demo_root):
    cmd = lambda out: ["-m", "transfer.finetune", "--dataset", f"folder:{demo_root}",  # noqa: E731
                       "--backbone", "timm:test_resnet", "--epochs", "2", "--batch-size", "8", "--workers", "1",
                       "--image-size", "32", "--mixup", "0.4", "--no-progress", "--fix", "--fix-epochs", "1",
                       "-o", "run.checkpoint_period=1", "-o", "run.checkpoint_minutes=0", "--out-dir", str(out)]
    duration = run_to_end(cmd(tmp_path / "ref"), tmp_path / "ref.log")
    kills = kill_and_resume(cmd(tmp_path / "cut"), tmp_path / "cut", duration, seed=2)
    assert kills
    for name in ("model.safetensors", "model_fix.safetensors"):
        same_tensors(load_file(tmp_path / "ref" / name), load_file(tmp_path / "cut" / name))


def test_detection_survives_kills(tmp_path, demo_root):
    coco = json.loads((demo_root / "annotations" / "instances_train.json").read_text())
    keep = {img["id"] for img in coco["images"][::8][:6]}
    subset = tmp_path / "train.json"
    subset.write_text(json.dumps(dict(coco, images=[i for i in coco["images"] if i["id"] in keep],
                                      annotations=[a for a in coco["annotations"] if a["image_id"] in keep])))
    tiny = ["model.fpn_channels=32", "model.box_head_dim=64", "model.train_sizes=[64]", "model.test_size=64",
            "model.max_size=64", "model.roi_batch_per_image=32", "model.rpn_post_nms_train=50",
            "model.rpn_post_nms_test=50", "run.workers=1", "data.batch_size=2", "schedule.warmup_iters=2",
            "schedule.iterations=6", "schedule.steps=[5]", "run.checkpoint_period=1", "run.log_period=2",
            f"data.train_json={subset}", f"data.train_images={demo_root}", f"data.val_json={subset}",
            f"data.val_images={demo_root}", "run.progress=false"]
    cmd = lambda out: ["-m", "detection.train", "-c", str(ROOT / "configs/detection/demo.yaml"),  # noqa: E731
                       "--out-dir", str(out), *(a for o in tiny for a in ("-o", o))]
    duration = run_to_end(cmd(tmp_path / "ref"), tmp_path / "ref.log")
    kills = kill_and_resume(cmd(tmp_path / "cut"), tmp_path / "cut", duration, seed=3)
    assert kills
    same_tensors(load_checkpoint(tmp_path / "ref" / "model_final.pt")["model"],
                 load_checkpoint(tmp_path / "cut" / "model_final.pt")["model"])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from distill.core.demo_data import generate

    root = tmp_path_factory.mktemp("pool")
    generate(root, num_classes=4, train_per_class=2, val_per_class=1, image_size=32, seed=2, unlabeled=48)
    return root / "unlabeled_list.txt"


def test_mining_survives_kills(tmp_path, pool):
    cmd = lambda out: ["-m", "distill.mine", "--teacher", "timm:test_resnet", "--num-classes", "4",  # noqa: E731
                       "--pool", str(pool), "--k", "5", "-o", str(out / "mined.txt"), "--shard-size", "4",
                       "--batch-size", "2", "--workers", "0", "--device", "cpu", "--input-size", "32",
                       "--no-progress"]
    duration = run_to_end(cmd(tmp_path / "ref"), tmp_path / "ref.log")
    kills = kill_and_resume(cmd(tmp_path / "cut"), tmp_path / "cut", duration, seed=4)
    assert kills
    assert (tmp_path / "ref" / "mined.txt").read_text() == (tmp_path / "cut" / "mined.txt").read_text()
    assert not list((tmp_path / "cut").glob("mined_state*")), "the resume state is removed after success"
