"""The ten transfer datasets of Kornblith et al. (2019), read through torchvision: one reader and one
`DatasetSpec` row each (title, metric, the files torchvision needs, how to get them, the protocol's sizes).

Official splits are used where they exist (Flowers train/val/test, DTD split 1, Aircraft variant
train/val/test); Caltech101 has the protocol's 102 classes (BACKGROUND_Google included, which torchvision
drops) and takes 30 training images per class (seeded); SUN397 uses partition 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torchvision.datasets as tvd

from .splits import MEAN_PER_CLASS, TOP1, DatasetNotFound, Split, _ImageFolder, per_class_take

CALTECH101_TRAIN_PER_CLASS = 30  # Kornblith et al. 2019
SUN397_PARTITION = 1             # Kornblith et al. 2019: split 1
DTD_PARTITION = 1


def _read_flowers102(root: Path, download: bool, seed: int):
    parts = [Split.whole(tvd.Flowers102(root, split=s, download=download)) for s in ("train", "val", "test")]
    return tvd.Flowers102.classes, *parts


def _read_caltech101(root: Path, download: bool, seed: int):
    """All 102 folders of 101_ObjectCategories: torchvision drops BACKGROUND_Google, the protocol keeps it."""
    if download:
        tvd.Caltech101(root, download=True)
    ds = _ImageFolder(root / "caltech101" / "101_ObjectCategories")
    whole = Split.whole(ds)
    train, test = per_class_take(whole.labels, CALTECH101_TRAIN_PER_CLASS, seed)
    return ds.classes, whole.subset(train), None, whole.subset(test)


def _read_pets(root: Path, download: bool, seed: int):
    trainval = tvd.OxfordIIITPet(root, split="trainval", download=download)
    test = tvd.OxfordIIITPet(root, split="test", download=download)
    return trainval.classes, Split.whole(trainval), None, Split.whole(test)


def _read_dtd(root: Path, download: bool, seed: int):
    parts = [tvd.DTD(root, split=s, partition=DTD_PARTITION, download=download) for s in ("train", "val", "test")]
    return parts[0].classes, *(Split.whole(p) for p in parts)


def _read_aircraft(root: Path, download: bool, seed: int):
    parts = [tvd.FGVCAircraft(root, split=s, annotation_level="variant", download=download)
             for s in ("train", "val", "test")]
    return parts[0].classes, *(Split.whole(p) for p in parts)


def _read_cars(root: Path, download: bool, seed: int):
    train, test = (tvd.StanfordCars(root, split=s) for s in ("train", "test"))
    return train.classes, Split.whole(train), None, Split.whole(test)


def sun397_partition_file(root: Path, kind: str) -> Path | None:
    name = f"{kind}_{SUN397_PARTITION:02d}.txt"
    for candidate in (root / "SUN397" / name, root / "SUN397" / "Partitions" / name, root / name):
        if candidate.is_file():
            return candidate
    return None


def _read_sun397(root: Path, download: bool, seed: int):
    ds = tvd.SUN397(root, download=download)
    files = [sun397_partition_file(root, k) for k in ("Training", "Testing")]
    if None in files:
        raise DatasetNotFound(
            f"SUN397 images found under {root / 'SUN397'}, but not the split-1 partition files "
            f"Training_01.txt / Testing_01.txt (looked in {root / 'SUN397'} and {root / 'SUN397' / 'Partitions'}); "
            "torchvision does not download them: get "
            "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip and unzip it into "
            f"{root / 'SUN397'}")
    data_dir = Path(ds._data_dir)
    position = {p.relative_to(data_dir).as_posix(): i for i, p in enumerate(ds._image_files)}
    whole = Split.whole(ds)
    splits = []
    for f in files:
        lines = [ln.strip().lstrip("/") for ln in f.read_text().splitlines() if ln.strip()]
        missing = [ln for ln in lines if ln not in position]
        if missing:
            raise DatasetNotFound(f"{f} lists {len(missing)} images not found under {data_dir} "
                                  f"(first: {missing[0]}); is the SUN397 extraction complete?")
        splits.append(whole.subset(position[ln] for ln in lines))
    return ds.classes, splits[0], None, splits[1]


def _read_cifar(cls):
    def read(root: Path, download: bool, seed: int):
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
        return train.classes, Split.whole(train), None, Split.whole(test)
    return read


def _read_food101(root: Path, download: bool, seed: int):
    train, test = (tvd.Food101(root, split=s, download=download) for s in ("train", "test"))
    return train.classes, Split.whole(train), None, Split.whole(test)


# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    metric: str
    num_classes: int                 # of the real dataset (for the docs table; the data decides)
    required: tuple                  # paths under the root that torchvision needs
    obtain: str                      # how to get it
    read: Callable
    protocol: tuple = ()             # (train, test) images in Kornblith et al. 2019, Table 1; train = trainval
    downloadable: bool = True


def _download_hint(url: str, layout: str) -> str:
    return f"pass --download to let torchvision fetch it, or download {url} yourself and extract it so that {layout}"


SPECS = {s.name: s for s in [
    DatasetSpec("flowers102", "Oxford Flowers-102", MEAN_PER_CLASS, 102,
                ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
                _download_hint("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, "
                               "imagelabels.mat, setid.mat)", "ROOT/flowers-102/jpg/image_00001.jpg exists"),
                _read_flowers102, protocol=(2040, 6149)),
    DatasetSpec("caltech101", "Caltech-101", MEAN_PER_CLASS, 102, ("caltech101/101_ObjectCategories",),
                _download_hint("https://data.caltech.edu/records/mzrjq-6wc02 (caltech-101.zip; torchvision "
                               "needs gdown)", "ROOT/caltech101/101_ObjectCategories/<class>/image_0001.jpg exists"),
                _read_caltech101, protocol=(3060, 6084)),
    DatasetSpec("pets", "Oxford-IIIT Pets", MEAN_PER_CLASS, 37,
                ("oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt",
                 "oxford-iiit-pet/annotations/test.txt"),
                _download_hint("https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz, annotations.tar.gz)",
                               "ROOT/oxford-iiit-pet/images and ROOT/oxford-iiit-pet/annotations exist"),
                _read_pets, protocol=(3680, 3669)),
    DatasetSpec("dtd", "Describable Textures (split 1)", TOP1, 47,
                ("dtd/dtd/images", "dtd/dtd/labels/train1.txt"),
                _download_hint("https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz)",
                               "ROOT/dtd/dtd/images and ROOT/dtd/dtd/labels exist"),
                _read_dtd, protocol=(3760, 1880)),
    DatasetSpec("aircraft", "FGVC-Aircraft (variant)", MEAN_PER_CLASS, 100,
                ("fgvc-aircraft-2013b/data/images", "fgvc-aircraft-2013b/data/variants.txt"),
                _download_hint("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)",
                               "ROOT/fgvc-aircraft-2013b/data/images exists"),
                _read_aircraft, protocol=(6667, 3333)),
    DatasetSpec("cars", "Stanford Cars", TOP1, 196,
                ("stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
                 "stanford_cars/cars_train", "stanford_cars/cars_test",
                 "stanford_cars/cars_test_annos_withlabels.mat"),
                "torchvision cannot download Stanford Cars (the original URL is gone; --download does not help). "
                "Get a copy of the original release (cars_train.tgz, cars_test.tgz, car_devkit.tgz and "
                "cars_test_annos_withlabels.mat, e.g. from the Kaggle or Hugging Face mirrors) and arrange it as "
                "ROOT/stanford_cars/{devkit/,cars_train/,cars_test/,cars_test_annos_withlabels.mat}",
                _read_cars, protocol=(8144, 8041), downloadable=False),
    DatasetSpec("sun397", "SUN397 (split 1)", TOP1, 397, ("SUN397/ClassName.txt",),
                _download_hint("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
                               "ROOT/SUN397/ClassName.txt exists")
                + "; the split-1 partition files come separately: unzip "
                "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip into ROOT/SUN397",
                _read_sun397, protocol=(19850, 19850)),
    DatasetSpec("cifar10", "CIFAR-10", TOP1, 10, ("cifar-10-batches-py/data_batch_1",),
                _download_hint("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                               "ROOT/cifar-10-batches-py/data_batch_1 exists"),
                _read_cifar(tvd.CIFAR10), protocol=(50000, 10000)),
    DatasetSpec("cifar100", "CIFAR-100", TOP1, 100, ("cifar-100-python/train",),
                _download_hint("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                               "ROOT/cifar-100-python/train exists"),
                _read_cifar(tvd.CIFAR100), protocol=(50000, 10000)),
    DatasetSpec("food101", "Food-101", TOP1, 101, ("food-101/meta/train.json", "food-101/images"),
                _download_hint("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                               "ROOT/food-101/meta and ROOT/food-101/images exist"),
                _read_food101, protocol=(75750, 25250)),
]}
TEN = tuple(SPECS)


def check_present(spec: DatasetSpec, root: Path, download: bool) -> None:
    missing = [root / p for p in spec.required if not (root / p).exists()]
    if not missing:
        return
    if download and spec.downloadable:
        return
    looked = ", ".join(str(p) for p in missing)
    why = ("--download was given, but " if download else "") + spec.obtain.replace("ROOT", str(root))
    raise DatasetNotFound(f"{spec.title} ({spec.name}) not found under the data root {root}: missing {looked}. "
                          f"{why}. (Set the root with --data-root or $SSLD_DATA.)")
