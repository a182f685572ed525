"""The splits of a transfer dataset: a `Split` (samples over torchvision datasets, labels known up front,
unreadable images skipped), the four splits of a `TransferData`, the seeded split helpers, and image-folder
datasets (ROOT/train, val, test with one class list)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torchvision.datasets as tvd
from PIL.Image import DecompressionBombError
from torch.utils.data import Dataset

from distill.core.errors import UserError
from distill.core.image_folder import folder_images
from distill.core.images import Skipped, load_rgb, to_rgb

MEAN_PER_CLASS, TOP1 = "mean_per_class", "top1"


class DatasetNotFound(UserError):
    pass


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
# Image folders.

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
