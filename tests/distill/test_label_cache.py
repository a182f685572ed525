"""distill.label_cache: training from cached labels sees the online stream's pixels with the stored labels,
resumes and shards like it, turns top-k into the teacher's distribution, and refuses recipes it does not fit."""
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distill import ssld
from distill.core.distributed import DistInfo
from distill.core.errors import UserError
from distill.core.images import normalize_on_device
from distill.data import build_sources
from distill.label_cache import (build_cached_stream, check_cache_compatible, collate_cached, dense_targets,
                                 part_path, read_manifest)
from distill.losses import DistillLoss
from distill.teacher import build_teacher
from helpers import cache_records, label_recipe, load_recipe, run_relabel

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def ranks(n):
    return [DistInfo(r, n, r, torch.device("cpu")) for r in range(n)]


def epoch_batches(stream, loader, epoch, start=0):
    stream.set_epoch(epoch, start)
    return list(loader)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, demo_root):
    """A bn-eval cache of 3 epochs, k=3 of 4 classes, shards of 2 batches, and its recipe."""
    tmp = tmp_path_factory.mktemp("cache")
    config = label_recipe(tmp, demo_root, "eval", schedule=dict(epochs=3))
    run_relabel(config, tmp / "labels", "--k", "3", "--shard-batches", "2")
    return config, tmp / "labels"


def test_reader_yields_the_online_pixels_with_the_stored_labels(cached):
    config, out = cached
    cfg = load_recipe(config)
    sources = build_sources(cfg.data.train, cfg.data.root)
    online_stream, online_loader = ssld.build_train_loader(cfg, sources, CPU)
    stream, loader, manifest = build_cached_stream(cfg, out, sources, CPU, num_classes=4)
    assert stream.batches_per_epoch == online_stream.batches_per_epoch == 6
    for epoch in (0, 2):
        online = epoch_batches(online_stream, online_loader, epoch)
        from_cache = epoch_batches(stream, loader, epoch)
        records = cache_records(out, manifest, epoch)
        assert len(online) == len(from_cache) == 6
        for b, ((x, y, _), (cx, cy, idx, prob, skipped)) in enumerate(zip(online, from_cache)):
            assert torch.equal(x, cx) and torch.equal(y, cy) and not skipped
            rows = slice(8 * b, 8 * b + 8)
            assert torch.equal(idx, torch.from_numpy(records["topk_idx"][rows].astype(np.int64)))
            assert torch.equal(prob, torch.from_numpy(records["topk_prob"][rows]))
    # resume mid-epoch, two DataLoader workers, two ranks: the same batches as one process from the start
    whole = epoch_batches(stream, loader, 1)
    resumed = epoch_batches(stream, loader, 1, start=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[3], b[3]) for a, b in zip(whole[3:], resumed))
    workers = DataLoader(stream, batch_size=8, num_workers=2, collate_fn=collate_cached)
    two_workers = epoch_batches(stream, workers, 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(whole, two_workers))
    per_rank = [build_cached_stream(cfg, out, sources, dist, num_classes=4)[:2] for dist in ranks(2)]
    halves = [epoch_batches(s, ld, 1) for s, ld in per_rank]
    for a, r0, r1 in zip(whole, *halves):
        assert torch.equal(a[0], torch.cat([r0[0], r1[0]])) and torch.equal(a[3], torch.cat([r0[3], r1[3]]))


def test_dense_targets_keep_the_top_k_and_spread_the_rest_evenly():
    idx = torch.tensor([[2, 0], [1, 3]])
    prob = torch.tensor([[0.6, 0.3], [0.5, 0.5]], dtype=torch.float16)
    dense = dense_targets(idx, prob, 5)
    expected = torch.tensor([[0.3, 0.1 / 3, 0.6, 0.1 / 3, 0.1 / 3], [0.0, 0.5, 0.0, 0.5, 0.0]])
    assert dense.dtype == torch.float32 and torch.allclose(dense, expected, atol=2e-4)
    assert torch.allclose(dense.sum(1), torch.ones(2), atol=1e-3)
    full = torch.softmax(torch.randn(3, 4), 1)
    top = full.topk(4, dim=1)
    assert torch.allclose(dense_targets(top.indices, top.values.half(), 4), full, rtol=2 ** -11, atol=0)


@pytest.mark.parametrize("kind, temperature", [("ssld", 1.0), ("jsd", 1.0), ("soft_ce", 1.0), ("kl", 2.0)])
def test_every_loss_from_the_cache_equals_the_online_loss_when_k_covers_every_class(tmp_path, demo_root, kind,
                                                                                   temperature):
    config = label_recipe(tmp_path, demo_root, "train", loss=dict(kind=kind, temperature=temperature),
                    schedule=dict(epochs=1))
    out = tmp_path / "labels"
    manifest = run_relabel(config, out, "--k", "4")
    assert manifest["temperature"] == temperature
    cfg = load_recipe(config)
    sources = build_sources(cfg.data.train, cfg.data.root)
    stream, loader, _ = build_cached_stream(cfg, out, sources, CPU, num_classes=4)
    teacher = build_teacher(cfg.teacher, 4, cfg.data.mean, cfg.data.std)
    criterion = DistillLoss(kind, temperature)
    torch.manual_seed(0)
    logits = torch.randn(8, 4) * 3
    for images, labels, idx, prob, _ in epoch_batches(stream, loader, 0):
        online = criterion(logits, teacher(normalize_on_device(images, cfg.data.mean, cfg.data.std),
                                           criterion.teacher_temperature), labels)[0]
        cached = criterion(logits, dense_targets(idx, prob, 4), labels)[0]
        assert torch.allclose(cached, online, rtol=2e-3, atol=1e-4), (kind, cached, online)


def test_an_unreadable_image_is_skipped_at_the_same_position_as_online(tmp_path, demo_root):
    shutil.copytree(demo_root, tmp_path / "data")
    victim = sorted((tmp_path / "data" / "train").rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:60])
    config = label_recipe(tmp_path, tmp_path / "data", "train", schedule=dict(epochs=1))
    manifest = run_relabel(config, tmp_path / "labels", "--k", "2")
    assert manifest["counts"] == dict(manifest["counts"], records=47, skipped=1)
    cfg = load_recipe(config)
    sources = build_sources(cfg.data.train, cfg.data.root)
    online = epoch_batches(*ssld.build_train_loader(cfg, sources, CPU), 0)
    from_cache = epoch_batches(*build_cached_stream(cfg, tmp_path / "labels", sources, CPU, num_classes=4)[:2], 0)
    for (x, _, skipped), (cx, _, idx, _, cskipped) in zip(online, from_cache):
        assert torch.equal(x, cx) and len(idx) == len(cx)
        assert [s.where for s in skipped] == [s.where for s in cskipped]
    assert sum(len(b[-1]) for b in from_cache) == 1


REFUSALS = [
    (["schedule.epochs=4"], r"schedule.epochs=4 but .* holds labels for 3 epoch\(s\).*--epochs 4"),
    (["data.input_size=40"], r"data.input_size 32 -> 40"),
    (["run.seed=1", "data.hflip=false"], r"run.seed 0 -> 1, data.hflip True -> False"),
    (["data.crop_scale=[0.5, 1.0]"], r"data.crop_scale"),
    (["teacher.input_size=48"], r"teacher.input_size None -> 48"),
    (["data.function_matching=true"], r"data.function_matching with teacher.cache: a mixed view"),
    (["loss.kind=kl", "loss.temperature=4.0"], r"loss.temperature \(teacher\) 1.0 -> 4.0"),
    (["data.epoch_samples=40"], r"data.epoch_samples 48 -> 40"),
    (["teacher.bn=train"], r"teacher.bn 'eval' -> 'train'"),
]


@pytest.mark.parametrize("overrides, message", REFUSALS)
def test_a_recipe_the_cache_does_not_fit_is_refused_in_one_line_naming_why(cached, overrides, message):
    config, out = cached
    cfg = load_recipe(config, *overrides)
    sources = build_sources(cfg.data.train, cfg.data.root)
    with pytest.raises(UserError, match=message) as e:
        build_cached_stream(cfg, out, sources, CPU, num_classes=4)
    assert "\n" not in str(e.value)


def test_class_count_loss_and_batch_coverage_are_checked(cached):
    config, out = cached
    manifest = read_manifest(out)
    cfg = load_recipe(config)
    with pytest.raises(UserError, match="written for 4 classes; this recipe has 5"):
        check_cache_compatible(cfg, manifest, num_classes=5)
    # bn eval: another batch size is fine when the cache covers the positions it draws ...
    check_cache_compatible(load_recipe(config, "data.batch_size=16"), manifest, world_size=2)
    # ... and refused when it draws past them (here: a cache that covered only 40 positions an epoch)
    short = dict(manifest, positions_per_epoch=40)
    with pytest.raises(UserError, match="data.batch_size=16 draws 48 images an epoch but .* covers the first 40"):
        check_cache_compatible(load_recipe(config, "data.batch_size=16"), short, world_size=1)


def test_batchnorm_train_labels_need_the_batches_they_were_written_for(tmp_path, demo_root):
    config = label_recipe(tmp_path, demo_root, "train", schedule=dict(epochs=1))
    run_relabel(config, tmp_path / "labels", "--k", "2")
    manifest = read_manifest(tmp_path / "labels")
    with pytest.raises(UserError, match=r"data.batch_size 8 -> 16"):
        check_cache_compatible(load_recipe(config, "data.batch_size=16"), manifest)
    with pytest.raises(UserError, match=r"world size \(torchrun processes\) 1 -> 2"):
        check_cache_compatible(load_recipe(config), manifest, world_size=2)


def test_a_missing_shard_is_named_before_training(cached, tmp_path):
    config, out = cached
    copy = tmp_path / "labels"
    shutil.copytree(out, copy)
    part_path(copy, 2, 1, 0, 1).unlink()
    cfg = load_recipe(config)
    with pytest.raises(UserError, match=r"epoch-0002/shard-00001-rank-000-of-001.safetensors is missing"):
        build_cached_stream(cfg, copy, build_sources(cfg.data.train, cfg.data.root), CPU, num_classes=4)


def test_the_reader_replays_the_recorded_crop_not_a_new_draw(cached, tmp_path):
    """The record, not the sampler, decides the crop: a cache is read the same way after the sampler changes."""
    from safetensors.torch import save_file
    from safetensors import safe_open

    config, out = cached
    copy = tmp_path / "labels"
    shutil.copytree(out, copy)
    path = part_path(copy, 0, 0, 0, 1)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["box"][0] = torch.tensor([3, 5, 20, 30], dtype=tensors["box"].dtype)   # top, left, height, width
    tensors["flip"][0] = 1 - tensors["flip"][0]
    save_file(tensors, str(path), metadata=meta)
    cfg = load_recipe(config)
    sources = build_sources(cfg.data.train, cfg.data.root)
    stream, loader, manifest = build_cached_stream(cfg, copy, sources, CPU, num_classes=4)
    first = epoch_batches(stream, loader, 0)[0][0]
    records = cache_records(copy, manifest, 0)
    expected = stream.transform.load_drawn(sources[int(records["source"][0])].samples[int(records["index"][0])][0],
                                           ((3, 5, 20, 30), bool(records["flip"][0])))[0]
    online = epoch_batches(*ssld.build_train_loader(cfg, sources, CPU), 0)[0][0]
    assert torch.equal(first[0], expected) and not torch.equal(first[0], online[0])
    assert torch.equal(first[1:], online[1:])


def test_moved_data_is_the_same_data_and_changed_images_are_refused(cached, tmp_path, demo_root):
    config, out = cached
    shutil.copytree(demo_root, tmp_path / "moved")
    cfg = load_recipe(config, f"data.root={tmp_path / 'moved'}")
    build_cached_stream(cfg, out, build_sources(cfg.data.train, cfg.data.root), CPU, num_classes=4)
    next((tmp_path / "moved" / "train").rglob("*.jpg")).rename(tmp_path / "moved" / "elsewhere.jpg")
    with pytest.raises(UserError, match=r"data.train \(images\) .*'size': 48\}\] -> .*'size': 47"):
        build_cached_stream(cfg, out, build_sources(cfg.data.train, cfg.data.root), CPU, num_classes=4)
