"""Data sources, the deterministic epoch plan, mixing by ratio, WebDataset shards, corrupt-image skipping."""
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distill.core.images import ListDataset, Skipped, build_transform, collate_skipping, load_rgb

from distill.data import (TrainStream, build_source, build_sources, epoch_plan, folder_source, infer_num_classes, list_source)
from distill.core.errors import UserError

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def transform(size=32):
    return build_transform("random_crop", size, MEAN, STD)


def batches(stream, loader_workers=0, epoch=0, start_batch=0):
    stream.set_epoch(epoch, start_batch)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=loader_workers,
                        collate_fn=collate_skipping)
    return list(loader)


def test_folder_and_list_sources_agree_on_labels(demo_root):
    folder = folder_source(demo_root / "train")
    listed = list_source(demo_root / "train_list.txt")
    assert folder.size == listed.size == 48
    assert sorted(folder.samples) == sorted(listed.samples)
    assert folder.classes == (demo_root / "classes.txt").read_text().split()
    assert infer_num_classes([folder]) == 4


def test_list_lines_without_label_are_unlabeled(tmp_path, demo_root):
    lst = tmp_path / "pool.txt"
    lst.write_text("".join(f"{p.relative_to(demo_root)}\n" for p in sorted((demo_root / "val").rglob("*.jpg"))))
    src = list_source(lst, image_root=demo_root)
    assert src.size == 24 and not src.labeled
    assert {label for _, label in src.samples} == {-1}


@pytest.mark.parametrize("spec, message", [
    ({"type": "folder", "path": "nowhere"}, "image folder not found"),
    ({"type": "list", "path": "missing.txt"}, "list file not found"),
    ({"type": "wds", "path": "shards/*.tar"}, "no shards match"),
    ({"type": "folder", "path": "empty"}, "holds no images"),
    ({"type": "list", "path": "empty.txt"}, "has no entries"),
    ({"type": "parquet", "path": "x"}, "type 'parquet' unknown"),
    ({"type": "folder", "path": "empty", "wieght": 2}, "unknown key"),
])
def test_missing_or_empty_source_is_a_clear_error(tmp_path, spec, message):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match=message):
        build_source(spec, root=tmp_path)
    with pytest.raises(UserError, match="data.train is empty"):
        build_sources([])


def test_load_rgb_raises_unreadable_for_truncated_and_non_images(tmp_path, demo_root):
    good = next((demo_root / "train").rglob("*.jpg"))
    assert load_rgb(good).mode == "RGB"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    for path in (bad, text):
        with pytest.raises(OSError, match=path.name):
            load_rgb(path)


def corrupt_copy(demo_root, tmp_path, n_bad=2):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "train", root)
    bad = sorted(root.rglob("*.jpg"))[:n_bad]
    for p in bad:
        p.write_bytes(p.read_bytes()[:100])
    return root, bad


def test_corrupt_images_are_skipped_and_reported_not_fatal(tmp_path, demo_root):
    root, bad = corrupt_copy(demo_root, tmp_path)
    src = folder_source(root)
    ds = ListDataset(src.samples, transform())
    items = [ds[i] for i in range(len(ds))]
    assert sum(isinstance(x, Skipped) for x in items) == 2
    stream = TrainStream([src], transform(), batch_size=8)
    out = batches(stream)
    assert len(out) == 6
    skipped = [s.where for _, _, batch_skipped in out for s in batch_skipped]
    assert sorted(skipped) == sorted(map(str, bad))
    assert sum(len(images) for images, _, _ in out) == 48 - 2


def test_epoch_plan_mixes_sources_by_ratio_and_repeats_a_small_source():
    plan = epoch_plan([10, 1000], [3, 1], 400, seed=0, epoch=0)
    counts = np.bincount(plan[:, 0])
    assert counts.tolist() == [300, 100]
    small = plan[plan[:, 0] == 0, 1]
    assert np.bincount(small, minlength=10).tolist() == [30] * 10  # every image 30 times, none more
    assert len(set(plan[plan[:, 0] == 1, 1].tolist())) == 100      # a subset of the large source, no repeats
    again = epoch_plan([10, 1000], [3, 1], 400, seed=0, epoch=0)
    assert (plan == again).all()
    assert not (plan == epoch_plan([10, 1000], [3, 1], 400, seed=0, epoch=1)).all()


def test_labeled_and_unlabeled_sources_mix_in_batches(tmp_path, demo_root):
    pool = tmp_path / "pool.txt"
    pool.write_text("".join(f"{p}\n" for p in sorted((demo_root / "val").rglob("*.jpg"))))
    sources = build_sources([{"type": "folder", "path": "train", "weight": 1},
                             {"type": "list", "path": str(pool), "weight": 1}], root=demo_root)
    stream = TrainStream(sources, transform(), batch_size=8, epoch_samples=64)
    labels = torch.cat([b[1] for b in batches(stream)])
    assert len(labels) == 64
    assert (labels == -1).sum().item() == 32


def test_same_pixels_with_workers_ranks_and_resume(demo_root):
    src = folder_source(demo_root / "train")
    whole = batches(TrainStream([src], transform(), batch_size=8, seed=3), epoch=1)
    # two DataLoader workers
    two_workers = batches(TrainStream([src], transform(), batch_size=8, seed=3), loader_workers=2, epoch=1)
    for a, b in zip(whole, two_workers):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # two DDP ranks with half the batch: concatenated, the single-process batch
    ranks = [batches(TrainStream([src], transform(), batch_size=4, seed=3, rank=r, world_size=2), epoch=1)
             for r in (0, 1)]
    for a, r0, r1 in zip(whole, *ranks):
        assert torch.equal(a[0], torch.cat([r0[0], r1[0]]))
    # resume from batch 4: the remaining batches unchanged
    resumed = batches(TrainStream([src], transform(), batch_size=8, seed=3), epoch=1, start_batch=4)
    assert len(resumed) == 2
    for a, b in zip(whole[4:], resumed):
        assert torch.equal(a[0], b[0])


def write_shards(demo_root, out, n_shards=2, corrupt_key=None):
    import webdataset as wds

    samples = folder_source(demo_root / "train").samples
    out.mkdir()
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"shard-{s:03d}.tar")) as w:
            for i, (path, label) in enumerate(samples[s::n_shards]):
                key = f"{s}_{i:04d}"
                data = open(path, "rb").read()
                w.write({"__key__": key, "jpg": data[:50] if key == corrupt_key else data, "cls": label})
    return samples


def test_webdataset_shards_stream_labels_skip_corrupt_and_resume(tmp_path, demo_root):
    write_shards(demo_root, tmp_path / "shards", corrupt_key="1_0003")
    src = build_source({"type": "wds", "path": "shards/shard-{000..001}.tar"}, root=tmp_path)
    assert src.size == 48 and len(src.shards) == 2
    stream = TrainStream([src], transform(), batch_size=8, seed=1, shuffle_buffer=16)
    out = batches(stream)
    labels = torch.cat([b[1] for b in out])
    skipped = [s.where for b in out for s in b[2]]
    assert len(labels) == 47 and skipped == [f"{tmp_path}/shards/shard-001.tar:1_0003"]
    assert sorted(np.bincount(labels.numpy()).tolist()) == [11, 12, 12, 12]
    resumed = batches(stream, start_batch=3)
    for a, b in zip(out[3:], resumed):
        assert torch.equal(a[0], b[0])
    two_workers = batches(stream, loader_workers=2)
    for a, b in zip(out, two_workers):
        assert torch.equal(a[0], b[0])


def test_webdataset_needs_a_shard_per_rank(tmp_path, demo_root):
    write_shards(demo_root, tmp_path / "shards", n_shards=1)
    src = build_source({"type": "wds", "path": str(tmp_path / "shards" / "*.tar")})
    with pytest.raises(UserError, match="shard per rank"):
        TrainStream([src], transform(), batch_size=4, world_size=2)


def test_test_transform_resizes_then_center_crops(demo_root):
    image = load_rgb(next((demo_root / "val").rglob("*.jpg")))
    t = build_transform("test", 48, MEAN, STD, crop_pct=0.75)
    assert t(image).shape == (3, 48, 48)
    with pytest.raises(UserError, match="unknown augmentation"):
        build_transform("autoaugment", 48, MEAN, STD)


def test_list_lines_plain_labeled_and_mined_with_score():
    from distill.data import UNLABELED, parse_list_line

    assert parse_list_line("a/b c.jpg") == ("a/b c.jpg", UNLABELED)  # spaces in an unlabeled path
    assert parse_list_line("train/x/1.jpg 3") == ("train/x/1.jpg", 3)
    assert parse_list_line("unlabeled/7.jpg 5 0.8731") == ("unlabeled/7.jpg", 5)  # distill.mine output
    assert parse_list_line("dir 2/img 4 1.0e-03") == ("dir 2/img", 4)
    assert parse_list_line("img 12 7") == ("img 12", 7)  # an integer last field is the label


def test_loader_bench_times_both_pipelines_over_the_same_images(tmp_path):
    from PIL import Image

    from distill.bench import format_loader, loader_bench, write_photo_jpegs

    root = write_photo_jpegs(tmp_path / "jpegs", 12, classes=2, sides=(60, 80))
    sizes = [Image.open(p).size for p in sorted(root.rglob("*.jpg"))]
    assert len(sizes) == 12 and all(60 <= s <= 80 for size in sizes for s in size)
    r = loader_bench(root, size=32, batch=4, rounds=2)
    assert len(r["rows"]) == 3
    assert all(row["images"] == 24 and row["img_per_s_per_core"] > 0 for row in r["rows"].values())
    assert next(iter(r["rows"].values()))["ratio"] == 1.0
    assert "img/s/core" in format_loader(r) and r["clock"] == "process CPU time"
