"""Each transfer dataset built from a small fake folder in its torchvision layout: split sizes, metric,
determinism of the seeded splits, and the message for a missing dataset."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from distill.core.errors import UserError
from distill.core.metrics import evaluate_classifier
from transfer.datasets import load_dataset, protocol_table
from transfer.splits import MEAN_PER_CLASS, TOP1, DatasetNotFound, Split, per_class_take, stratified_split
from transfer.ten_datasets import SPECS, TEN
from transfer.datasets import main as datasets_main


def _jpg(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def _lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))


# Fake folders, one per dataset: (builder, expected split sizes train/val/test, classes)

def fake_flowers102(root):
    base = root / "flowers-102"
    labels = np.repeat([1, 2, 3], 6)              # 18 images, 3 classes (1-based like the .mat)
    for i in range(1, 19):
        _jpg(base / "jpg" / f"image_{i:05d}.jpg", i)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels})
    ids = np.arange(1, 19).reshape(3, 6)          # per class: 2 train, 1 val, 3 test
    scipy.io.savemat(base / "setid.mat", {"trnid": ids[:, :2].ravel(), "valid": ids[:, 2].ravel(),
                                          "tstid": ids[:, 3:].ravel()})
    return dict(train=6, val=3, test=9)


def fake_caltech101(root):
    base = root / "caltech101" / "101_ObjectCategories"
    for c, n in (("accordion", 33), ("airplanes", 35), ("anchor", 31)):
        for i in range(1, n + 1):
            _jpg(base / c / f"image_{i:04d}.jpg", i)
    for i in range(1, 33):   # torchvision drops this folder; the protocol's 102 classes keep it
        _jpg(base / "BACKGROUND_Google" / f"image_{i:04d}.jpg", 100 + i)
    # 30 per class for training (6 of them held out as val), the rest (2 + 3 + 5 + 1) for test
    return dict(train=96, val=24, test=11)


def fake_pets(root):
    base = root / "oxford-iiit-pet"
    rows = {"trainval": [], "test": []}
    for label, breed in enumerate(("Abyssinian", "beagle"), 1):
        for i in range(1, 9):
            _jpg(base / "images" / f"{breed}_{i}.jpg", i)
            rows["trainval" if i <= 5 else "test"].append(f"{breed}_{i} {label} {label} 1")
    for split, lines in rows.items():
        _lines(base / "annotations" / f"{split}.txt", lines)
    return dict(train=8, val=2, test=6)   # trainval 5/class -> 1 held out per class


def fake_dtd(root):
    base = root / "dtd" / "dtd"
    rows = {"train1": [], "val1": [], "test1": [], "train2": []}
    for c in ("banded", "blotchy", "braided"):
        for i in range(1, 7):
            _jpg(base / "images" / c / f"{c}_{i:04d}.jpg", i)
            split = "train1" if i <= 2 else "val1" if i == 3 else "test1"
            rows[split].append(f"{c}/{c}_{i:04d}.jpg")
            rows["train2"].append(f"{c}/{c}_{i:04d}.jpg")   # another partition must be ignored
    for split, lines in rows.items():
        _lines(base / "labels" / f"{split}.txt", lines)
    return dict(train=6, val=3, test=9)


def fake_aircraft(root):
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A320", "Cessna 172"]
    _lines(data / "variants.txt", variants)
    counts = {"train": 2, "val": 1, "test": 2}
    n = 0
    for split, k in counts.items():
        rows = []
        for v in variants:
            for _ in range(k):
                n += 1
                _jpg(data / "images" / f"{1000000 + n}.jpg", n)
                rows.append(f"{1000000 + n} {v}")
        _lines(data / f"images_variant_{split}.txt", rows)
        _lines(data / f"images_family_{split}.txt", [r.split()[0] + " fam" for r in rows])
    return dict(train=6, val=3, test=6)


def _mat_annotations(rows):
    rec = np.zeros(len(rows), dtype=[("fname", "O"), ("class", "O")])
    for i, (fname, cls) in enumerate(rows):
        rec[i] = (fname, np.uint8(cls))
    return rec


def fake_cars(root):
    base = root / "stanford_cars"
    train, test = [], []
    for cls in (1, 2):
        for i in range(5):
            name = f"{cls}{i:04d}.jpg"
            _jpg(base / "cars_train" / name, i)
            train.append((name, cls))
        for i in range(3):
            name = f"{cls}{i:04d}.jpg"
            _jpg(base / "cars_test" / name, i)
            test.append((name, cls))
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": _mat_annotations(train)})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": _mat_annotations(test)})
    scipy.io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array(["AM General Hummer", "Acura RL"], dtype=object)})
    return dict(train=8, val=2, test=6)


def fake_sun397(root):
    base = root / "SUN397"
    classes = ["/a/abbey", "/b/bakery/shop", "/c/campus"]
    _lines(base / "ClassName.txt", classes)
    train, test = [], []
    for c in classes:
        for i in range(6):
            rel = f"{c}/sun_{c.replace('/', '')}{i}.jpg"
            _jpg(base / rel.lstrip("/"), i)
            if i < 3:
                train.append(rel)
            elif i < 5:
                test.append(rel)     # the sixth image is in neither partition-1 list
    _lines(base / "Training_01.txt", train)
    _lines(base / "Testing_01.txt", test)
    return dict(train=6, val=3, test=6)


def _cifar_batch(path, labels, key):
    data = np.random.default_rng(len(labels)).integers(0, 255, (len(labels), 3072), dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump({"data": data, key: list(labels)}, f)


def fake_cifar10(root):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for b in range(1, 6):
        _cifar_batch(base / f"data_batch_{b}", [0, 1, 2, 0, 1, 2], "labels")  # 30 train, 10 per class
    _cifar_batch(base / "test_batch", [0, 1, 2, 2], "labels")
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird"]}, f)
    return dict(train=24, val=6, test=4)


def fake_cifar100(root):
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    _cifar_batch(base / "train", [0, 1] * 10, "fine_labels")
    _cifar_batch(base / "test", [0, 1, 1], "fine_labels")
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["apple", "aquarium_fish"]}, f)
    return dict(train=16, val=4, test=3)


def fake_food101(root):
    base = root / "food-101"
    meta = {"train": {}, "test": {}}
    for c in ("apple_pie", "baby_back_ribs"):
        for i in range(7):
            _jpg(base / "images" / c / f"{i}.jpg", i)
            meta["train" if i < 5 else "test"].setdefault(c, []).append(f"{c}/{i}")
    (base / "meta").mkdir(parents=True)
    for split, content in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(content))
    return dict(train=8, val=2, test=4)


FAKES = {name: globals()[f"fake_{name}"] for name in SPECS}
EXPECTED_METRIC = {"flowers102": MEAN_PER_CLASS, "caltech101": MEAN_PER_CLASS, "pets": MEAN_PER_CLASS,
                   "aircraft": MEAN_PER_CLASS, "dtd": TOP1, "cars": TOP1, "sun397": TOP1, "cifar10": TOP1,
                   "cifar100": TOP1, "food101": TOP1}


@pytest.fixture
def skip_md5(monkeypatch):
    """Flowers102 and CIFAR check md5 sums of the real files; fake files cannot match them."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(flowers, "check_integrity", lambda *a, **k: True)


def test_the_ten_datasets_are_registered_with_the_protocol_metric():
    assert {n: s.metric for n, s in SPECS.items()} == EXPECTED_METRIC


@pytest.mark.parametrize("name", list(SPECS))
def test_fake_dataset_gives_protocol_splits_and_metric(name, tmp_path, skip_md5):
    expected = FAKES[name](tmp_path)
    data = load_dataset(name, tmp_path, val_fraction=0.2, seed=0)
    sizes = data.sizes()
    assert {k: sizes[k] for k in ("train", "val", "test")} == expected
    assert sizes["trainval"] == expected["train"] + expected["val"]
    assert data.metric == EXPECTED_METRIC[name]
    # val is disjoint from train, and every split's labels agree with the images it reads
    assert len(set(data.trainval.items)) == len(data.trainval)
    image, label = data.test[0]
    assert image.mode == "RGB" and 0 <= label < data.num_classes
    assert sorted(set(data.trainval.labels)) == sorted(set(data.test.labels))


def test_caltech101_takes_30_per_class_deterministically_from_the_seed(tmp_path):
    fake_caltech101(tmp_path)
    a = load_dataset("caltech101", tmp_path, seed=0)
    b = load_dataset("caltech101", tmp_path, seed=0)
    c = load_dataset("caltech101", tmp_path, seed=1)
    assert a.classes == ["BACKGROUND_Google", "accordion", "airplanes", "anchor"]
    assert [a.trainval.labels.count(y) for y in range(4)] == [30, 30, 30, 30]
    assert [a.test.labels.count(y) for y in range(4)] == [2, 3, 5, 1]
    assert a.trainval.items == b.trainval.items and a.val.items == b.val.items
    assert set(a.test.items) != set(c.test.items)
    assert not set(a.trainval.items) & set(a.test.items)


def test_held_out_validation_is_stratified_seeded_and_independent_of_other_classes():
    labels = [0] * 10 + [1] * 20 + [2] * 1
    kept, held = stratified_split(labels, 0.2, seed=3)
    assert [sum(labels[p] == y for p in held) for y in range(3)] == [2, 4, 0]
    assert sorted(kept + held) == list(range(len(labels)))
    assert stratified_split(labels, 0.2, seed=3) == (kept, held)
    # class 1's draw does not move when class 0 grows
    more = [0] * 15 + [1] * 20
    held_1 = [p - 10 for p in held if labels[p] == 1]
    assert [p - 15 for p in stratified_split(more, 0.2, seed=3)[1] if more[p] == 1] == held_1
    taken, rest = per_class_take(labels, 5, seed=0)
    assert [sum(labels[p] == y for p in taken) for y in range(3)] == [5, 5, 1] and len(rest) == 20


def test_sun397_uses_partition_1_and_names_the_missing_partition_files(tmp_path):
    fake_sun397(tmp_path)
    data = load_dataset("sun397", tmp_path)
    assert data.classes == ["abbey", "bakery/shop", "campus"]
    assert sorted(set(data.trainval.labels)) == [0, 1, 2]
    (tmp_path / "SUN397" / "Testing_01.txt").unlink()
    with pytest.raises(DatasetNotFound, match="Partitions.zip"):
        load_dataset("sun397", tmp_path)


def test_folder_dataset_with_and_without_test_split(demo_root, tmp_path):
    data = load_dataset(f"folder:{demo_root}")
    assert data.num_classes == 4 and data.metric == TOP1
    assert data.sizes() == dict(train=40, val=8, trainval=48, test=24)   # val held out of train/
    (tmp_path / "ds").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / "ds" / split).symlink_to(demo_root / ("train" if split == "train" else "val"))
    data = load_dataset(f"folder:{tmp_path / 'ds'}")
    assert data.sizes() == dict(train=48, val=24, trainval=72, test=24)


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("flowers102", tmp_path)
    assert str(tmp_path / "flowers-102" / "jpg") in str(e.value) and "--download" in str(e.value)
    with pytest.raises(DatasetNotFound, match="cannot download Stanford Cars") as e:
        load_dataset("cars", tmp_path, download=True)
    with pytest.raises(UserError, match="did you mean 'flowers102'"):
        load_dataset("flowers", tmp_path)


def test_reported_metric_is_mean_per_class_not_top1_on_imbalanced_data():
    # 8 images of class 0 all right, 2 of class 1 all wrong: top-1 80 %, mean per class 50 %
    targets = torch.tensor([0] * 8 + [1] * 2)
    logits = torch.nn.functional.one_hot(torch.zeros(10, dtype=torch.long), 2).float()
    model = torch.nn.Identity()
    result = evaluate_classifier(model, [(logits, targets)], "cpu", num_classes=2)
    assert result["top1"] == pytest.approx(80.0) and result[MEAN_PER_CLASS] == pytest.approx(50.0)


def _copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_symlink_loop_in_an_image_folder_neither_inflates_nor_mislabels(demo_root, tmp_path):
    ds = tmp_path / "ds"
    for split in ("train", "val"):
        _copy_tree(demo_root / split, ds / split)
    clean = load_dataset(f"folder:{ds}")
    classes = sorted(p.name for p in (ds / "train").iterdir())
    (ds / "train" / classes[0] / "loop").symlink_to("..")                  # the whole split again, and again
    (ds / "train" / classes[1] / "alias").symlink_to(ds / "train" / classes[2])  # another class's images
    (ds / "train" / classes[1] / "self").symlink_to(".")
    looped = load_dataset(f"folder:{ds}")
    assert looped.sizes() == clean.sizes()
    assert looped.train.items == clean.train.items and looped.train.labels == clean.train.labels
    paths = [looped.train.sources[s].samples[j][0] for s, j in looped.trainval.items]
    assert len(set(map(os.path.realpath, paths))) == len(paths) and not any(set(Path(p).relative_to(ds).parts) & {"loop", "alias", "self"} for p in paths)
    for path, label in (looped.train.sources[0].samples):
        assert os.path.relpath(path, ds / "train").split(os.sep)[0] == classes[label]


def test_directory_symlink_out_of_the_tree_is_followed(demo_root, tmp_path):
    """A dataset assembled from links (images kept elsewhere) still reads: links leaving the tree count."""
    ds = tmp_path / "ds"
    _copy_tree(demo_root / "val", ds / "val")
    for c in (demo_root / "train").iterdir():
        (ds / "train" / c.name).mkdir(parents=True)
        (ds / "train" / c.name / "elsewhere").symlink_to(c)
    data = load_dataset(f"folder:{ds}")
    assert data.sizes() == load_dataset(f"folder:{demo_root}").sizes()


def test_caltech101_has_the_protocols_102_classes():
    assert SPECS["caltech101"].num_classes == 102 and SPECS["caltech101"].protocol == (3060, 6084)


def test_the_table_shows_found_split_sizes_next_to_the_protocols(tmp_path, skip_md5, capsys):
    fake_caltech101(tmp_path)
    with pytest.raises(UserError, match="1 of 2 datasets not found.*flowers102"):
        datasets_main(["caltech101", "flowers102", "--data-root", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("caltech101  4 classes, train 120 (fit 96 + val 24), test 11, metric mean_per_class")
    assert "differs from the protocol 102 classes, train 3060, test 6084" in out[1]
    assert out[2].startswith("flowers102  missing (protocol 102 classes, train 2040, test 6149)")
    lines, missing = protocol_table(TEN, tmp_path)
    assert len(lines) == 10 and len(missing) == 9
    assert all(f"train {s.protocol[0]}, test {s.protocol[1]}" in line for s, line in zip(SPECS.values(), lines))


def test_download_without_network_names_the_dataset_and_the_manual_download(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("cifar10", tmp_path, download=True)
    message = str(e.value)
    assert message.startswith("CIFAR-10 (cifar10): --download failed (URLError: ")
    assert "cifar-10-python.tar.gz yourself" in message and str(tmp_path / "cifar-10-batches-py") in message


def test_bomb_and_broken_images_are_skipped_and_16_bit_is_scaled(demo_root, tmp_path, monkeypatch):
    import PIL.Image
    from distill.core.images import Skipped
    ds = tmp_path / "ds"
    for split in ("train", "val"):
        _copy_tree(demo_root / split, ds / split)
    classes = sorted(p.name for p in (ds / "train").iterdir())
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)   # 0..65520
    PIL.Image.fromarray(ramp).save(ds / "train" / classes[0] / "zz_16bit.png")
    (ds / "train" / classes[0] / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    big = PIL.Image.new("L", (400, 400))                                        # a bomb once the limit is low
    big.save(ds / "train" / classes[0] / "zz_bomb.png")
    data = load_dataset(f"folder:{ds}")
    train = data.train.sources[0]
    index = {os.path.basename(p): i for i, (p, _) in enumerate(train.samples)}
    split = Split([train], [(0, index[n]) for n in ("zz_16bit.png", "zz_broken.jpg", "zz_bomb.png")], [0, 0, 0])
    image, _ = split[0]
    assert image.mode == "RGB" and abs(np.asarray(image).mean() - 127.5) < 1.5      # not ~254 (clipped)
    assert isinstance(split[1], Skipped)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 20_000)                  # 400 x 400 > 2 x the limit
    bomb = split[2]
    assert isinstance(bomb, Skipped) and "DecompressionBombError" in bomb.reason


def test_class_folders_that_differ_between_splits_are_a_clear_error(demo_root, tmp_path):
    ds = tmp_path / "ds"
    for split in ("train", "val"):
        _copy_tree(demo_root / split, ds / split)
    extra = ds / "val" / "zzz_extra"
    _copy_tree(next((ds / "val").iterdir()), extra)                 # images that no train class owns
    with pytest.raises(DatasetNotFound, match="only in val/: zzz_extra. Every split needs the same class folders"):
        load_dataset(f"folder:{ds}")
    import shutil
    shutil.rmtree(extra)
    gone = sorted((ds / "val").iterdir())[0]
    shutil.rmtree(gone)
    with pytest.raises(DatasetNotFound, match=f"only in train/: {gone.name}"):
        load_dataset(f"folder:{ds}")
    shutil.rmtree(ds / "train" / gone.name)
    assert load_dataset(f"folder:{ds}").num_classes == 3
