"""The transfer datasets, read from a local root through torchvision.datasets (Kornblith et al. protocol).

Every dataset gives four splits: `train` and `val` for model selection, `trainval` (their union) for the
final fit, and `test` for the reported number. Official splits are used where they exist (Flowers
train/val/test, DTD split 1, Aircraft variant train/val/test); elsewhere `val` is a stratified held-out
fraction of the official training set, drawn from a seed. Caltech101 has the protocol's 102 classes
(BACKGROUND_Google included, which torchvision drops), takes 30 training images per class (seeded) and
tests on the rest; SUN397 uses partition 1 (Training_01.txt / Testing_01.txt).

    python -m transfer.datasets [NAME ...] [--data-root DIR] [--download]   # found split sizes vs the protocol's
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torchvision.datasets as tvd
from PIL.Image import DecompressionBombError
from torch.utils.data import Dataset

from distill.core.images import Skipped, load_rgb, to_rgb
from distill.core.atomic import OUTPUT_ERRNOS
from distill.core.errors import ArgumentParser, UserError, run_cli

MEAN_PER_CLASS, TOP1 = "mean_per_class", "top1"
CALTECH101_TRAIN_PER_CLASS = 30  # Kornblith et al. 2019
SUN397_PARTITION = 1             # Kornblith et al. 2019: split 1
DTD_PARTITION = 1


class DatasetNotFound(UserError):
    pass


def default_data_root() -> Path:
    return Path(os.environ.get("SSLD_DATA", "data")).expanduser()


@dataclass
class Split(Dataset):
    """A list of (source, index) samples over one or more torchvision datasets, with labels known up front.

    Sources are built without a transform; `with_transform` attaches one (RGB conversion included, since
    Caltech101 holds greyscale images). An unreadable image yields `distill.data.Skipped` instead of
    raising; `distill.data.collate_skipping` drops it from the batch."""
    sources: list
    items: list            # (source number, index in that source)
    labels: list
    transform: Callable | None = field(default=None, repr=False)

    @classmethod
    def whole(cls, source: Dataset) -> "Split":
        return cls([source], [(0, i) for i in range(len(source))], dataset_labels(source))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        s, j = self.items[i]
        try:
            image = self.sources[s][j][0]
            image.load()  # decode now: a truncated file fails here, not inside a transform
            image = to_rgb(image)  # 16-bit greyscale scaled, not clipped to white
        except (OSError, SyntaxError, ValueError, DecompressionBombError) as e:  # what PIL raises for broken files
            return Skipped(_describe(self.sources[s], j), f"{type(e).__name__}: {e}")
        return (self.transform(image) if self.transform else image), self.labels[i]

    def subset(self, positions) -> "Split":
        positions = list(positions)
        return Split(self.sources, [self.items[p] for p in positions], [self.labels[p] for p in positions],
                     self.transform)

    def __add__(self, other: "Split") -> "Split":
        sources = list(self.sources)
        number = {}
        for k, src in enumerate(other.sources):
            match = next((n for n, mine in enumerate(sources) if mine is src), None)
            if match is None:
                sources.append(src)
                match = len(sources) - 1
            number[k] = match
        return Split(sources, self.items + [(number[s], j) for s, j in other.items],
                     self.labels + other.labels, self.transform)

    def with_transform(self, transform) -> "Split":
        return Split(self.sources, self.items, self.labels, transform)


@dataclass
class TransferData:
    name: str
    metric: str                  # the reported metric: mean_per_class or top1
    classes: list
    train: Split
    val: Split
    test: Split
    root: Path

    @property
    def trainval(self) -> Split:
        return self.train + self.val

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict:
        return dict(train=len(self.train), val=len(self.val), trainval=len(self.trainval), test=len(self.test))


def _describe(source, index: int) -> str:
    for attr in ("_image_files", "_images", "samples", "_samples"):
        if hasattr(source, attr):
            item = getattr(source, attr)[index]
            return str(item[0] if isinstance(item, tuple) else item)
    return f"{type(source).__name__}[{index}]"


def dataset_labels(ds: Dataset) -> list[int]:
    """Labels without decoding images: torchvision keeps them under one of these names."""
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return [int(v) for v in getattr(ds, attr)]
    if hasattr(ds, "_samples"):  # StanfordCars
        return [int(s[1]) for s in ds._samples]
    return [int(ds[i][1]) for i in range(len(ds))]


def stratified_split(labels, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) positions: per class, round(fraction * n) held out (at least one when n >= 2),
    chosen by a permutation seeded by (seed, class) so the split does not depend on other classes."""
    by_class: dict[int, list[int]] = {}
    for pos, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(pos)
    kept, held = [], []
    for y, positions in sorted(by_class.items()):
        n = len(positions)
        k = min(max(int(round(fraction * n)), 1 if n >= 2 else 0), n - 1) if fraction > 0 else 0
        order = np.random.default_rng([seed, y]).permutation(n)
        held += [positions[i] for i in sorted(order[:k])]
        kept += [positions[i] for i in sorted(order[k:])]
    return sorted(kept), sorted(held)


def per_class_take(labels, per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(taken, rest): `per_class` positions of every class, seeded by (seed, class)."""
    by_class: dict[int, list[int]] = {}
    for pos, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(pos)
    taken, rest = [], []
    for y, positions in sorted(by_class.items()):
        order = np.random.default_rng([seed, y]).permutation(len(positions))
        taken += [positions[i] for i in order[:per_class]]
        rest += [positions[i] for i in order[per_class:]]
    return sorted(taken), sorted(rest)


# ---------------------------------------------------------------------------------------------------
# Readers: root -> (classes, train, val or None, test) from the torchvision classes.

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


def _key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def folder_images(directory, class_to_idx: dict, is_valid_file) -> list[tuple[str, int]]:
    """torchvision's ImageFolder listing (same order), minus what symlinks would add twice.

    A directory symlink is followed only when it leads outside the folder tree (a dataset assembled from
    links); one leading back into it (`ln -s .. train/circle/loop`, an alias of another class) is skipped,
    and every file is listed once, at its real place when it has one inside the tree."""
    directory = os.path.expanduser(str(directory))
    in_tree_dirs, in_tree_files = set(), set()
    for dirpath, _, filenames in os.walk(directory):           # followlinks=False: the tree itself
        in_tree_dirs.add(_key(dirpath))
        in_tree_files.update(_key(os.path.join(dirpath, f)) for f in filenames
                             if not os.path.islink(os.path.join(dirpath, f)))
    samples, seen_dirs, seen_files = [], set(), set()
    for target_class in sorted(class_to_idx):
        class_dir = os.path.join(directory, target_class)
        if not os.path.isdir(class_dir):
            continue
        walked = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            seen_dirs.add(_key(dirpath))
            kept = []
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    try:
                        k = _key(full)
                    except OSError:                             # a dangling link
                        continue
                    if k in in_tree_dirs or k in seen_dirs:
                        continue
                    seen_dirs.add(k)
                kept.append(d)
            dirnames[:] = kept
            walked.append((dirpath, filenames))
        for dirpath, filenames in sorted(walked):
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not is_valid_file(path):
                    continue
                try:
                    k = _key(path)
                except OSError:
                    continue
                if k in seen_files or (os.path.islink(path) and k in in_tree_files):
                    continue
                seen_files.add(k)
                samples.append((path, class_to_idx[target_class]))
    return samples


class _ImageFolder(tvd.ImageFolder):
    """torchvision's ImageFolder with the symlink-safe listing of `folder_images`, decoding through
    distill.core.images.load_rgb (16-bit scaled; bombs and broken files raise UnreadableImage)."""

    def __init__(self, root, **kwargs):
        super().__init__(root, loader=load_rgb, **kwargs)

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        from torchvision.datasets.folder import has_file_allowed_extension
        valid = is_valid_file or (lambda p: has_file_allowed_extension(p, extensions))
        samples = folder_images(directory, class_to_idx, valid)
        present = {y for _, y in samples}
        empty = sorted(c for c, i in class_to_idx.items() if i not in present)
        if empty and not allow_empty:
            raise FileNotFoundError(f"found no images for the classes {', '.join(empty)} "
                                    f"(extensions {', '.join(extensions or ())})")
        return samples


class _FolderWithClasses(_ImageFolder):
    """An ImageFolder whose class list is given (the train folder's), so val/test labels agree with it."""

    def __init__(self, root, classes):
        self._given = list(classes)
        super().__init__(root)

    def find_classes(self, directory):
        return self._given, {c: i for i, c in enumerate(self._given)}


def _check_same_classes(path: Path, split: str, classes: list) -> None:
    """One label mapping for every split: a class folder in val/ or test/ that train/ lacks (or the other
    way round) would silently drop images or leave a class unscored."""
    if not (path / split).is_dir():
        return
    found = sorted(d.name for d in os.scandir(path / split) if d.is_dir())
    extra, lacking = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
    if extra or lacking:
        raise DatasetNotFound(f"the class folders of {path / split} differ from {path / 'train'}'s"
                              + (f": only in {split}/: {', '.join(extra)}" if extra else "")
                              + (f"; only in train/: {', '.join(lacking)}" if lacking else "")
                              + ". Every split needs the same class folders (one label mapping)")


def read_image_folder(path: Path):
    """PATH/train, PATH/val and optionally PATH/test. Without test/, val/ is the reported split and the
    selection split is held out of train/ (so that train+val never contains the reported images)."""
    try:
        train = _ImageFolder(path / "train")
        for split in ("val", "test"):
            _check_same_classes(path, split, train.classes)
        val = _FolderWithClasses(path / "val", train.classes)
        test = _FolderWithClasses(path / "test", train.classes) if (path / "test").is_dir() else None
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetNotFound(f"cannot read the image folder {path}: {e}. Expected {path}/train/<class>/*.jpg "
                              "and val/<class>/*.jpg (optionally test/<class>/*.jpg)") from None
    if test is None:
        return train.classes, Split.whole(train), None, Split.whole(val)
    return train.classes, Split.whole(train), Split.whole(val), Split.whole(test)


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


def dataset_names() -> str:
    return ", ".join(TEN) + ", demo, folder:PATH"


def _check_present(spec: DatasetSpec, root: Path, download: bool) -> None:
    missing = [root / p for p in spec.required if not (root / p).exists()]
    if not missing:
        return
    if download and spec.downloadable:
        return
    looked = ", ".join(str(p) for p in missing)
    why = ("--download was given, but " if download else "") + spec.obtain.replace("ROOT", str(root))
    raise DatasetNotFound(f"{spec.title} ({spec.name}) not found under the data root {root}: missing {looked}. "
                          f"{why}. (Set the root with --data-root or $SSLD_DATA.)")


def _demo_root(root: Path) -> Path:
    """The demo downstream task (4 shapes the demo students never saw, 10 labels each) under ROOT/demo,
    generated on first use: it is procedural, not a download."""
    path = root / "demo"
    if not (path / "demo_data.json").is_file():  # written last: its absence means missing or incomplete
        from distill.core.demo_data import PRESETS, format_summary, generate
        print(f"demo data not found in {path}: generating the downstream preset", flush=True)
        print(format_summary(generate(path, **PRESETS["downstream"], overwrite=True)), flush=True)
    return path


def load_dataset(name: str, root=None, download: bool = False, val_fraction: float = 0.2,
                 seed: int = 0) -> TransferData:
    """`name` is one of the ten, `demo`, or `folder:PATH`. Splits are deterministic given `seed`."""
    root = (Path(root).expanduser() if root else default_data_root()).absolute()
    if name == "demo" or name.startswith("folder:"):
        path = _demo_root(root) if name == "demo" else Path(name[len("folder:"):]).expanduser()
        classes, train, val, test = read_image_folder(path)
        root, metric = path, TOP1
    elif name in SPECS:
        spec = SPECS[name]
        _check_present(spec, root, download)
        try:
            classes, train, val, test = spec.read(root, download, seed)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DatasetNotFound(f"{spec.title} under {root}: torchvision says {e}. "
                                  f"{spec.obtain.replace('ROOT', str(root))}") from None
        except ImportError as e:  # Flowers102 and StanfordCars read .mat files with scipy; Caltech101's download gdown
            raise UserError(f"{spec.title} needs {e.name or 'scipy'} to read or fetch its files: "
                            f"pip install {e.name or 'scipy'}") from None
        except OSError as e:      # urllib.error.URLError, socket errors: no network, a proxy, a dead mirror
            if not download or getattr(e, "errno", None) in OUTPUT_ERRNOS:
                raise
            reason = getattr(e, "reason", None) or e.strerror or e
            raise DatasetNotFound(f"{spec.title} ({spec.name}): --download failed ({type(e).__name__}: {reason}); "
                                  f"without network, {spec.obtain.replace('ROOT', str(root))}".replace(
                                      "pass --download to let torchvision fetch it, or ", "")) from None
        metric = spec.metric
    else:
        import difflib
        near = difflib.get_close_matches(name, list(SPECS) + ["demo"], n=1)
        raise UserError(f"unknown dataset {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                        + f"; expected one of {dataset_names()}")
    if val is None:
        kept, held = stratified_split(train.labels, val_fraction, seed)
        train, val = train.subset(kept), train.subset(held)
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise DatasetNotFound(f"{name} under {root}: a split is empty "
                              f"(train {len(train)}, val {len(val)}, test {len(test)})")
    return TransferData(name, metric, list(classes), train, val, test, root)


def protocol_table(names, root: Path, download: bool = False) -> tuple[list[str], list[str]]:
    """(lines, names not found): per dataset the classes and split sizes found next to the protocol's."""
    lines, missing = [], []
    for name in names:
        spec = SPECS.get(name)
        want = (f"protocol {spec.num_classes} classes, train {spec.protocol[0]}, test {spec.protocol[1]}"
                if spec and spec.protocol else "")
        try:
            d = load_dataset(name, root, download=download)
        except UserError as e:
            missing.append(name)
            lines.append(f"{name:11s} missing{' (' + want + ')' if want else ''}: {e}")
            continue
        s = d.sizes()
        found = (d.num_classes, s["trainval"], s["test"])
        verdict = ("" if not want else "  = protocol" if found == (spec.num_classes, *spec.protocol) else
                   f"  differs from the {want}")
        lines.append(f"{name:11s} {d.num_classes} classes, train {s['trainval']} (fit {s['train']} + val "
                     f"{s['val']}), test {s['test']}, metric {d.metric}{verdict} ({d.root})")
    return lines, missing


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m transfer.datasets", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"datasets to check (default: the ten); {dataset_names()}")
    parser.add_argument("--data-root", default=None, help="default $SSLD_DATA or ./data")
    parser.add_argument("--download", action="store_true", help="let torchvision fetch the missing ones (network)")
    args = parser.parse_args(argv)
    root = Path(args.data_root).expanduser() if args.data_root else default_data_root()
    print(f"data root: {root.resolve()}")
    lines, missing = protocol_table(args.names or TEN, root, args.download)
    print("\n".join(lines), flush=True)
    if args.names and missing:   # asked for by name: a script must see that they are not there
        first = next(line for line in lines if line.startswith(f"{missing[0]:11s} missing")).split(": ", 1)[1]
        raise UserError(f"{len(missing)} of {len(args.names)} datasets not found under {root}: {missing[0]}: {first}"
                        + (f" (and {', '.join(missing[1:])}, listed above)" if len(missing) > 1 else ""))


if __name__ == "__main__":
    run_cli(main)
