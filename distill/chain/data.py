"""What `distill.chain` reads before it trains anything: the user's ImageFolder, its class list and splits,
and the unlabeled pool. Every problem here is one line that says what to do, before any step runs.

DATA is `train/<class>/*` plus `val/<class>/*`. Without val/ the chain draws a seeded, stratified share of
train/ as val and writes the split as a folder of links (OUT/data/{train,val}), so that every trainer reads
the same images; with a test/ folder as well, the same view leaves test/ out (the chain reports on val/).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distill.core.atomic import atomic_write
from distill.core.errors import UserError
from distill.core.image_folder import list_image_folder
from distill.core.image_size import spread
from distill.core.images import UnreadableImage, load_rgb
from distill.mine.pool import Pool, open_pool

POOL_PROBE = 32   # pool images decoded before any training, to refuse a pool none of which reads


@dataclass
class ChainData:
    """The splits the trainers read, with the facts the defaults are derived from. Reading writes nothing:
    a split view is only planned (`view_pairs`) until `write_view`, after every other check has passed."""
    root: Path                      # an ImageFolder with train/ and val/ (DATA itself, or OUT/data)
    classes: list[str]
    train_counts: dict[str, int]
    val_counts: dict[str, int]
    split: str                      # how val came about, for the console and the report
    train_files: list[str] = field(default_factory=list, repr=False)
    view_pairs: list | None = field(default=None, repr=False)   # (file, split, path under the split)
    view_key: dict = field(default_factory=dict, repr=False)

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def val(self) -> Path:
        return self.root / "val"

    @property
    def n_train(self) -> int:
        return sum(self.train_counts.values())

    @property
    def n_val(self) -> int:
        return sum(self.val_counts.values())

    @property
    def unbalanced(self) -> bool:
        """Class sizes differ by more than a quarter (train or val): mean per-class accuracy is then reported."""
        return any(max(c.values()) > 1.25 * max(min(c.values()), 1) for c in (self.train_counts, self.val_counts))

    def write_view(self) -> None:
        """OUT/data/{train,val}/<class>/<file> as links to DATA's images, written under a temporary name and
        renamed (a half-built view never looks finished); kept when split.json says it is this split."""
        if self.view_pairs is None:
            return
        view, marker = self.root, self.root / "split.json"
        if marker.is_file() and json.loads(marker.read_text()) == self.view_key:
            return
        tmp = view.with_name(view.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for path, where, rel in self.view_pairs:
            link = tmp / where / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            _link(Path(path).resolve(), link)
        atomic_write(tmp / "split.json", lambda t: Path(t).write_text(json.dumps(self.view_key, indent=1)))
        shutil.rmtree(view, ignore_errors=True)
        os.replace(tmp, view)


def class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir())


def _listing(folder: Path, classes: list[str]) -> tuple[dict[str, int], list[str]]:
    names, samples = list_image_folder(folder, classes)
    counts = Counter(names[label] for _, label in samples)
    empty = [c for c in classes if not counts[c]]
    if empty:
        raise UserError(f"{folder}: no images in the class folder(s) {', '.join(empty[:5])}; every class needs "
                        "images in every split (remove the folder or add images)")
    return {c: counts[c] for c in classes}, [p for p, _ in samples]


def check_same_classes(train: Path, other: Path) -> None:
    a, b = class_folders(train), class_folders(other)
    if a != b:
        only_train, only_other = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        detail = "; ".join(x for x in (f"only in {other.name}/: {', '.join(only_other)}" if only_other else "",
                                      f"only in train/: {', '.join(only_train)}" if only_train else "") if x)
        raise UserError(f"the class folders of {other} differ from {train}'s ({detail}); give every split the "
                        "same class folders (labels are indices into one sorted class list)")


def read_data(data, out: Path, val_fraction: float, seed: int) -> ChainData:
    """DATA checked, and where needed a split planned (written by ChainData.write_view)."""
    data = Path(data).expanduser()
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder (expected an ImageFolder: DATA/train/<class>/*.jpg, "
                        "and DATA/val/<class>/*.jpg or none)")
    train = data / "train"
    if not train.is_dir():
        raise UserError(f"--data {data} has no train/ folder: put one folder per class under {train} "
                        f"(and optionally {data / 'val'}), e.g. {train}/cat/001.jpg")
    classes = class_folders(train)
    if len(classes) < 2:
        raise UserError(f"{train} holds {len(classes)} class folder(s); a classifier needs at least 2 "
                        "(one folder per class: train/cat/*.jpg, train/dog/*.jpg)")
    train_counts, train_files = _listing(train, classes)
    view, key = Path(out) / "data", dict(data=str(data.resolve()), fraction=val_fraction, seed=seed)
    if (data / "val").is_dir():
        check_same_classes(train, data / "val")
        val_counts, val_files = _listing(data / "val", classes)
        if not (data / "test").is_dir():
            return ChainData(data, classes, train_counts, val_counts, f"{data / 'val'}", train_files)
        check_same_classes(train, data / "test")
        pairs = [(f, "train", _relative(f, train)) for f in train_files]
        pairs += [(f, "val", _relative(f, data / "val")) for f in val_files]
        return ChainData(view, classes, train_counts, val_counts, f"{data / 'val'} (test/ left out)", train_files,
                         pairs, dict(key, fraction=0.0))
    if min(train_counts.values()) < 2:
        raise UserError(f"{train} has a class with {min(train_counts.values())} image and no val/ folder: a split "
                        "needs at least 2 images per class (add a DATA/val folder or more images)")
    pairs = _stratified(train_files, train, val_fraction, seed)
    counts = {w: Counter(rel.parts[0] for _, where, rel in pairs if where == w) for w in ("train", "val")}
    return ChainData(view, classes, {c: counts["train"][c] for c in classes}, {c: counts["val"][c] for c in classes},
                     f"a seeded {val_fraction:.0%} share of {train} per class (seed {seed}; --val-fraction)",
                     [f for f, where, _ in pairs if where == "train"], pairs, key)


def _stratified(files, train: Path, fraction: float, seed: int) -> list[tuple[str, str, Path]]:
    """(file, split, path under the split) with `fraction` of each class (at least 1, never all) in val."""
    by_class: dict[str, list[tuple[str, Path]]] = {}
    for f in files:
        rel = _relative(f, train)
        by_class.setdefault(rel.parts[0], []).append((f, rel))
    rng = random.Random(seed)
    pairs = []
    for c in sorted(by_class):
        items = sorted(by_class[c])
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
        pairs += [(f, "val", rel) for f, rel in items[:n_val]] + [(f, "train", rel) for f, rel in items[n_val:]]
    return pairs


def _relative(path, folder: Path) -> Path:
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder)))


def _link(target: Path, link: Path) -> None:
    try:
        link.symlink_to(target)
    except OSError:   # a file system without symlinks: a copy is the same image
        shutil.copy2(target, link)


# ---------------------------------------------------------------------------------------------------
# The unlabeled pool.

def read_pool(spec) -> Pool:
    """The pool opened (a folder, a list file or WebDataset shards) and probed: a pool none of whose first
    decoded images reads is refused here, before hours of training meet it."""
    pool = open_pool(spec, what="--unlabeled")
    if pool.kind != "files":
        return pool   # shards are read by mining itself; an empty or broken tar fails there, counted
    probe = spread([p for p, _ in pool.samples], POOL_PROBE)
    for path in probe:
        try:
            load_rgb(path)
            return pool
        except UnreadableImage:
            continue
    raise UserError(f"--unlabeled {spec}: none of {len(probe)} sampled images of its {len(pool.samples)} could be "
                    "read (corrupt, truncated or not images); point it at a folder of images or a list file "
                    "of image paths")
