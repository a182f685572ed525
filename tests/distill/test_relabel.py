"""distill.relabel: the cached soft labels are the teacher's output for the trainer's exact crops, in the
trainer's batches; the writer resumes per shard, shards under torchrun, and refuses what cannot be cached."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import ssld
from distill.core.distributed import DistInfo
from distill.core.errors import UserError
from distill.core.images import build_transform, normalize_on_device
from distill.data import build_sources
from distill.label_cache import part_header, part_path, read_manifest
from distill.teacher import build_teacher
from helpers import cache_records, label_recipe, load_recipe, run_relabel

REPO = Path(__file__).resolve().parents[2]
CPU = DistInfo(0, 1, 0, torch.device("cpu"))
FP16_REL = 2.0 ** -11   # fp16 rounds to within half an ulp: 2^-11 relative for normal numbers


def teacher_on_records(cfg, records, per_rank_batch, global_batch):
    """The teacher's probabilities, recomputed here: each record's crop rebuilt from its box and flip, grouped
    into the batches training runs the teacher on (rank slices of global batches)."""
    d = cfg.data
    sources = build_sources(d.train, d.root)
    transform = build_transform(d.augment, d.input_size, d.mean, d.std, d.crop_pct, d.crop_scale, d.hflip,
                                d.interpolation, output="uint8")
    teacher = build_teacher(cfg.teacher, 4, d.mean, d.std).to("cpu")
    crops = [transform.load_drawn(sources[s].samples[i][0], (tuple(int(v) for v in box), bool(f)))[0]
             for s, i, box, f in zip(records["source"], records["index"], records["box"], records["flip"])]
    groups = records["position"] // global_batch * (global_batch // per_rank_batch) \
        + records["position"] % global_batch // per_rank_batch
    probs = torch.empty(len(crops), 4)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        x = normalize_on_device(torch.stack([crops[i] for i in rows]), d.mean, d.std)
        probs[torch.from_numpy(rows)] = teacher(x)
    return probs


def assert_fp16_equal(records, probs):
    idx = torch.from_numpy(records["topk_idx"].astype(np.int64))
    stored = torch.from_numpy(records["topk_prob"]).float()
    expected = probs.gather(1, idx)
    assert torch.equal(idx, probs.topk(idx.shape[1], dim=1).indices)   # the teacher's top-k, in order
    assert (stored - expected).abs().le(expected * FP16_REL + 2.0 ** -24).all(), \
        (stored - expected).abs().max()


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_cached_labels_are_the_teachers_output_for_the_recorded_crop_in_its_batch(tmp_path, demo_root, bn):
    config = label_recipe(tmp_path, demo_root, bn)
    out = tmp_path / "labels"
    manifest = run_relabel(config, out, "--k", "3", "--shard-batches", "4")
    assert (manifest["epochs"], manifest["k"], manifest["bn"], manifest["num_classes"]) == (2, 3, bn, 4)
    assert manifest["counts"]["records"] == 2 * 48 and manifest["shards_per_epoch"] == 2
    cfg = load_recipe(config)
    for epoch in range(2):
        records = cache_records(out, manifest, epoch)
        assert records["position"].tolist() == list(range(48))
        probs = teacher_on_records(cfg, records, 8, 8)
        assert_fp16_equal(records, probs)
        if bn == "train":   # batch statistics: the same crops in other batches get other labels
            other = teacher_on_records(cfg, records, 4, 4)
            assert (other - probs).abs().max() > 1e-3
    # the two epochs drew different crops
    a, b = cache_records(out, manifest, 0), cache_records(out, manifest, 1)
    assert not np.array_equal(a["box"], b["box"])


def test_boxes_and_flips_are_the_ones_the_trainer_draws(tmp_path, demo_root):
    """The crop rebuilt from a record is, pixel for pixel, the image distill.ssld's stream yields there."""
    config = label_recipe(tmp_path, demo_root, "eval")
    out = tmp_path / "labels"
    manifest = run_relabel(config, out, "--k", "2")
    cfg = load_recipe(config)
    sources = build_sources(cfg.data.train, cfg.data.root)
    stream, loader = ssld.build_train_loader(cfg, sources, CPU)
    transform = stream.transform
    for epoch in range(2):
        stream.set_epoch(epoch)
        online = torch.cat([b[0] for b in loader])
        records = cache_records(out, manifest, epoch)
        replayed = torch.stack([transform.load_drawn(sources[s].samples[i][0], (tuple(map(int, box)), bool(f)))[0]
                                for s, i, box, f in zip(records["source"], records["index"], records["box"],
                                                        records["flip"])])
        assert torch.equal(online, replayed)
        assert records["flip"].min() == 0 and records["flip"].max() == 1   # flips drawn, both ways


def test_rerun_continues_at_the_shard_a_kill_stopped_and_keeps_finished_shards(tmp_path, demo_root, monkeypatch):
    import distill.relabel as rl

    config = label_recipe(tmp_path, demo_root, "train")
    reference = tmp_path / "reference"
    run_relabel(config, reference, "--k", "3", "--shard-batches", "2")

    out = tmp_path / "labels"
    real_write, written = rl.write_part, []

    def killed_after_two(path, records, header):
        if len(written) == 2:    # the third shard dies mid-write: its temporary holds half the bytes
            def half(tmp):
                Path(tmp).write_bytes(b"\0" * 100)
                raise KeyboardInterrupt
            from distill.core.atomic import atomic_write
            atomic_write(path, half)
        written.append(path)
        return real_write(path, records, header)

    monkeypatch.setattr(rl, "write_part", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_relabel(config, out, "--k", "3", "--shard-batches", "2")
    done = sorted(out.rglob("*.safetensors"))
    assert len(done) == 2 and not list(out.rglob("*.tmp"))    # no half file, under any name
    assert read_manifest(out)["epochs"] == 0
    # a truncated part (a disk that lied) is not taken as done either
    broken = part_path(out, 1, 0, 0, 1)
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(done[0].read_bytes()[:200])
    assert part_header(broken) is None
    # a writer killed by SIGKILL leaves its temporary (named for its host and pid): never read, removed
    from distill.core.atomic import _HOST
    stale = broken.parent / f".{broken.name}.{_HOST}-{2**22 + 1}.x1.tmp"
    stale.write_bytes(b"\0" * 100)

    monkeypatch.setattr(rl, "write_part", real_write)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}
    rewritten = []
    monkeypatch.setattr(rl, "write_part", lambda path, *a: rewritten.append(Path(path)) or real_write(path, *a))
    manifest = run_relabel(config, out, "--k", "3", "--shard-batches", "2")
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == before     # finished shards kept
    assert len(rewritten) == 6 - 2 and broken in rewritten                        # the rest, the broken one too
    assert manifest["epochs"] == 2 and manifest["counts"]["records"] == 96 and not stale.exists()
    ref = read_manifest(reference)
    for epoch in range(2):
        a, b = cache_records(out, manifest, epoch), cache_records(reference, ref, epoch)
        for key in a:
            assert np.array_equal(a[key], b[key]), key


def test_more_epochs_extend_the_cache_and_other_settings_are_refused(tmp_path, demo_root):
    config = label_recipe(tmp_path, demo_root, "eval")
    out = tmp_path / "labels"
    assert run_relabel(config, out, "--epochs", "1", "--k", "2")["epochs"] == 1
    first = part_path(out, 0, 0, 0, 1).stat().st_mtime_ns
    assert run_relabel(config, out, "--epochs", "3", "--k", "2")["epochs"] == 3
    assert part_path(out, 0, 0, 0, 1).stat().st_mtime_ns == first
    with pytest.raises(UserError, match=r"k 2 -> 3"):
        run_relabel(config, out, "--k", "3")
    with pytest.raises(UserError, match=r"data.input_size 32 -> 40.*another --out-dir"):
        run_relabel(config, out, "--k", "2", "-o", "data.input_size=40")


@pytest.mark.parametrize("override, message", [
    ("data.augment=test", "draws no random crop"),
    ("data.function_matching=true", "no cached label can hold it"),
    ("teacher=null", "no teacher"),
])
def test_relabel_refuses_what_cannot_be_cached(tmp_path, demo_root, override, message):
    config = label_recipe(tmp_path, demo_root, "eval")
    with pytest.raises(UserError, match=message):
        run_relabel(config, tmp_path / "labels", "-o", override, "-o", "loss.kind=ce" if override == "teacher=null"
                else "loss.kind=ssld")
    assert not (tmp_path / "labels").exists()


def test_relabel_refuses_webdataset_sources(tmp_path, demo_root):
    config = label_recipe(tmp_path, demo_root, "eval", data=dict(train=[dict(type="wds", path="pool-{0..1}.tar")]))
    with pytest.raises(UserError, match="WebDataset.*by index"):
        run_relabel(config, tmp_path / "labels")


def test_torchrun_ranks_label_their_slices_of_the_training_batches(tmp_path, demo_root):
    """BatchNorm in train mode under two processes: each rank's labels are the teacher on that rank's half
    of each global batch, which is what the teacher sees when training runs on two processes."""
    config = label_recipe(tmp_path, demo_root, "train")
    out = tmp_path / "labels"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "distill.relabel", "-c", config, "--out-dir", str(out), "--k", "3",
                           "--epochs", "1", "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(out)
    assert (manifest["world_size"], manifest["per_rank_batch"], manifest["epochs"]) == (2, 4, 1)
    records = cache_records(out, manifest, 0)
    assert records["position"].tolist() == list(range(48))
    assert_fp16_equal(records, teacher_on_records(load_recipe(config), records, 4, 8))
    assert json.loads((out / "manifest.json").read_text())["settings"]["world size (torchrun processes)"] == 2


def test_cache_bench_times_both_steps_on_the_same_batches_and_sizes_the_labels(capsys):
    from distill.bench import main as bench_main

    r = bench_main(["--cache", "--teacher", "timm:test_resnet", "--student", "timm:test_convnext", "--batch", "8",
                    "--size", "32", "--steps", "2", "--warmup", "1", "--workers", "0", "--device", "cpu",
                    "--rounds", "2", "--epochs", "2", "--k", "3"])
    assert r["online"]["images"] == r["cached"]["images"] == 2 * 8
    assert r["flops"]["ratio"] > 2   # a tiny pair with the teacher several times the student's forward cost
    w = r["write"]
    assert w["image_epochs"] == 2 * 64 and r["k"] == 3
    assert w["record_bytes"] == 4 + 1 + 4 + 8 + 1 + 3 * 2 + 3 * 2   # position, source, index, box, flip, top-k
    assert w["record_bytes"] < w["bytes_per_image_epoch"] < w["record_bytes"] + 20   # plus one header a shard
    out = capsys.readouterr().out
    assert "cached / online step throughput" in out and "bytes per image-epoch" in out and "machine:" in out
