"""distill.ssld with `teacher.cache: LABELS/`, through the CLIs (distill.relabel writes the cache): a cached run
is, bit for bit, the online run whose teacher answers with what the cache stores (its top-k in fp16, the
rest of the mass spread evenly), for every loss kind; it resumes exactly, trains under torchrun, names the
teacher behind the cache in its artifact, and a recipe the cache does not fit is refused in one line."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill import ssld
from distill.core.checkpoint import load_checkpoint
from distill.core.errors import run_cli
from distill.label_cache import dense_targets
from distill.students.artifact import read_meta
from distill.teacher import Teacher
from helpers import cache_records, label_recipe, run_relabel

REPO = Path(__file__).resolve().parents[2]
CLASSES = 4     # label_recipe's teacher and data: 4 classes, 48 train images, batch 8: 6 steps an epoch


def train(config, out_dir, *overrides):
    """python -m distill.ssld -c CONFIG --out-dir OUT_DIR -o ..., in this process; the student's weights."""
    ssld.main(["-c", config, "--out-dir", str(out_dir), *(a for o in overrides for a in ("-o", o))])
    return load_file(out_dir / "run.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind, temperature, k", [
    ("ssld", 1.0, CLASSES), ("jsd", 1.0, CLASSES), ("kl", 2.0, CLASSES), ("soft_ce", 1.0, CLASSES),
    ("ssld", 1.0, 2),     # fewer classes than the data has: the uniform tail
])
def test_a_cached_run_is_the_online_run_with_the_teachers_answer_as_stored(tmp_path, demo_root, monkeypatch, kind,
                                                                           temperature, k):
    """Why bit for bit: relabel runs the teacher on the very batches training draws (the same plan, crops
    and batch mates, which BatchNorm in train mode depends on) and training replays the recorded crops, so
    the one difference between a cached and an online step is the teacher's probabilities. An online teacher
    that answers with what the cache stores (the top-k rounded to fp16, the rest of the mass spread evenly
    over the other classes; with k = the class count simply its output rounded to fp16) makes the two runs
    the same float operations in the same order."""
    config = label_recipe(tmp_path, demo_root, "train", loss=dict(kind=kind, temperature=temperature))
    labels = tmp_path / "labels"
    manifest = run_relabel(config, labels, "--k", str(k))
    assert (manifest["epochs"], manifest["k"], manifest["temperature"]) == (2, k, temperature)
    # no teacher.models: the cache alone trains, and the artifact takes the teacher's name from it
    cached = train(config, tmp_path / "cached", f"teacher.cache={labels}", "teacher.models=[]")

    answers = []
    real_call = Teacher.__call__

    def as_stored(self, images, temperature=1.0):
        probs = real_call(self, images, temperature)
        top = probs.topk(k, dim=1)
        stored = dense_targets(top.indices, top.values.half(), CLASSES)
        answers.append((probs, stored))
        return stored

    monkeypatch.setattr(Teacher, "__call__", as_stored)
    online = train(config, tmp_path / "online")
    assert len(answers) == 2 * 6
    assert_same_weights(cached, online)

    # what relabel stored is exactly that answer: the online teacher's top-k for the same crops, in fp16
    for epoch in range(2):
        records = cache_records(labels, manifest, epoch)
        probs = torch.cat([p for p, _ in answers[6 * epoch:6 * epoch + 6]])
        top = probs.topk(k, dim=1)
        assert torch.equal(torch.from_numpy(records["topk_idx"].astype(np.int64)), top.indices)
        assert torch.equal(torch.from_numpy(records["topk_prob"]), top.values.half())
    probs, stored = answers[0]
    if k == CLASSES:
        assert torch.equal(stored, probs.half().float())
    else:   # every class outside the top-k gets an equal share of the rest, above zero
        tail = stored.scatter(1, probs.topk(k, dim=1).indices, -1.0)
        rest = tail[tail >= 0].view(len(probs), CLASSES - k)
        assert torch.equal(rest, rest[:, :1].expand_as(rest)) and (rest > 0).all()
        assert torch.allclose(stored.sum(1), torch.ones(len(probs)), atol=1e-3)

    pre = read_meta(tmp_path / "cached" / "run.safetensors")["pretrain"]
    assert pre["teacher"] == [str(tmp_path / "teacher.safetensors")]
    assert pre["teacher_cache"] == dict(path=str(labels), k=k, fingerprint=manifest["fingerprint"])
    assert pre["loss"]["kind"] == kind and pre["loss"]["temperature"] == temperature
    assert "teacher_cache" not in read_meta(tmp_path / "online" / "run.safetensors")["pretrain"]


def test_a_cached_run_interrupted_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, demo_root, monkeypatch,
                                                                                capsys):
    # dropout and drop path: the RNG resumes too; a DataLoader worker replays the crops
    config = label_recipe(tmp_path, demo_root, "eval", student=dict(arch="timm:test_resnet", drop_rate=0.3,
                                                                   drop_path_rate=0.2),
                          run=dict(checkpoint_period=2, workers=1, seed=3))
    labels = tmp_path / "labels"
    run_relabel(config, labels, "--k", "3", "--shard-batches", "2")
    cache = f"teacher.cache={labels}"
    reference = train(config, tmp_path / "ref", cache)

    calls = []

    def dies_at_step_10(*args):
        calls.append(1)
        if len(calls) == 10:   # epoch 1, batch 3: the last checkpoint is step 8, two batches into the epoch
            raise RuntimeError("injected failure")
        return dense_targets(*args)

    monkeypatch.setattr(ssld, "dense_targets", dies_at_step_10)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(config, tmp_path / "cut", cache)
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["engine"]
    assert (state["epoch"], state["batch"], state["iteration"]) == (1, 2, 8)
    monkeypatch.setattr(ssld, "dense_targets", dense_targets)
    capsys.readouterr()
    resumed = train(config, tmp_path / "cut", cache)     # the same command again
    assert "resumed from" in capsys.readouterr().err
    assert_same_weights(reference, resumed)


def test_two_torchrun_processes_train_from_a_cache_one_process_wrote_as_one_process_does(tmp_path, demo_root):
    """teacher.bn eval: the labels do not depend on the batch, so a cache written by one process serves two.
    A LayerNorm student: per-rank BatchNorm statistics would legitimately differ from one big batch."""
    config = label_recipe(tmp_path, demo_root, "eval", student=dict(arch="timm:test_convnext"),
                          schedule=dict(epochs=1))
    labels = tmp_path / "labels"
    assert run_relabel(config, labels, "--k", "3")["world_size"] == 1
    single = train(config, tmp_path / "single", f"teacher.cache={labels}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "distill.ssld", "-c", config, "--out-dir", str(tmp_path / "ddp"),
                           "-o", f"teacher.cache={labels}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cached labels" in proc.stderr and "2 process(es)" in proc.stderr
    ddp = load_file(tmp_path / "ddp" / "run.safetensors")
    assert single.keys() == ddp.keys()
    for key in single:   # the gradient all-reduce sums in another order: float rounding, no more
        assert torch.allclose(single[key], ddp[key], atol=1e-5, rtol=1e-4), key
    assert read_meta(tmp_path / "ddp" / "run.safetensors")["pretrain"]["teacher_cache"]["k"] == 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory, demo_root):
    """A 2-epoch, k=3 cache of the ssld recipe (teacher BatchNorm in eval mode) and the recipe."""
    tmp = tmp_path_factory.mktemp("refusals")
    config = label_recipe(tmp, demo_root, "eval")
    run_relabel(config, tmp / "labels", "--k", "3")
    return config, tmp / "labels"


@pytest.mark.parametrize("overrides, message", [
    (["schedule.epochs=3"], (r"schedule.epochs=3 but \S+ holds labels for 2 epoch\(s\); write the rest with "
                             r"python -m distill.relabel .*--epochs 3")),
    (["data.crop_scale=[0.5, 1.0]"], (r"differs from \S+ in what the cached crops and labels depend on: "
                                      r"data.crop_scale \[0.3, 1.0\] -> \[0.5, 1.0\]")),
    (["data.input_size=40"], r"data.input_size 32 -> 40"),
    (["teacher.input_size=48"], r"teacher.input_size None -> 48"),
    (["run.seed=1"], r"run.seed 0 -> 1"),
    (["teacher.models=[timm:test_resnet]"], r"teacher.models \[.*teacher.safetensors'\] -> \['timm:test_resnet'\]"),
    (["loss.kind=kl", "loss.temperature=4.0"], r"loss.temperature \(teacher\) 1.0 -> 4.0"),
    (["data.function_matching=true"], r"data.function_matching with teacher.cache: a mixed view .* no cached label"),
    (["loss.kind=ce"], r"loss.kind ce trains without a teacher"),
])
def test_a_recipe_the_cache_does_not_fit_is_refused_in_one_line(cache, tmp_path, capsys, overrides, message):
    config, labels = cache
    with pytest.raises(SystemExit) as exit_:
        run_cli(ssld.main, ["-c", config, "--out-dir", str(tmp_path / "run"), "-o", f"teacher.cache={labels}",
                            *(a for o in overrides for a in ("-o", o))])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "run.safetensors").exists()


def test_a_cache_for_another_class_count_is_refused_in_one_line(cache, tmp_path, capsys):
    config, labels = cache
    root = Path(yaml.safe_load(Path(config).read_text())["data"]["root"])
    for split in ("train", "val"):   # the demo data less one class
        for name in sorted(p.name for p in (root / split).iterdir())[:3]:
            shutil.copytree(root / split / name, tmp_path / "three" / split / name)
    with pytest.raises(SystemExit):
        run_cli(ssld.main, ["-c", config, "--out-dir", str(tmp_path / "run"), "-o", f"teacher.cache={labels}",
                            "-o", f"data.root={tmp_path / 'three'}"])
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(str(labels))} was written for 4 classes; this recipe has 3\n", err), err


def test_kl_at_temperature_1_and_ssld_share_a_cache(cache, tmp_path):
    """Only kl softens the teacher: a cache written for ssld holds kl's labels at temperature 1, and trains it."""
    config, labels = cache
    train(config, tmp_path / "kl", f"teacher.cache={labels}", "loss.kind=kl", "loss.temperature=1.0",
          "schedule.epochs=1")
    assert read_meta(tmp_path / "kl" / "run.safetensors")["pretrain"]["loss"]["kind"] == "kl"
