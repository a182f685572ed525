"""COCO-format detection data: validated loading, a restartable training stream, corrupt-image skipping.

Any COCO json works: `file_name` is read relative to the image folder. Everything wrong with the
annotations (negative box sizes, unknown categories or images, missing files) is reported with the
offending id before training starts. Crowd boxes are left out of the training targets (detectron2) and
kept in the evaluation ground truth, where COCOeval ignores detections that fall on them. What is left out
is counted (`CocoSplit.summary`): crowd and zero-size boxes, images left without a usable box, categories
that no annotation uses (Roboflow exports carry such a placeholder, id 0); a split with no usable box at
all is refused, since it would train on nothing and score AP 0.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.core.distributed import DistInfo
from distill.core.errors import UserError
from distill.core.images import load_rgb
from distill.core.trainer_kit import sharded_eval_loader

MAX_LISTED_ERRORS = 5


class AnnotationError(UserError):
    pass


@dataclass
class CocoSplit:
    """One annotation file, checked. `boxes[i]` / `labels[i]` are image i's training targets (xyxy pixels,
    labels 1..K in category-id order; crowd and zero-size boxes left out)."""
    json_path: Path
    image_root: Path
    image_ids: list[int]
    paths: list[Path]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    category_ids: list[int]
    class_names: list[str]
    counts: dict = field(default_factory=dict)      # boxes, crowd, degenerate, images_without_boxes
    unused_categories: list = field(default_factory=list)   # (id, name) of categories no annotation uses

    def __len__(self) -> int:
        return len(self.image_ids)

    def summary(self) -> str:
        """One line for the log: what the split holds and what was left out."""
        c = self.counts
        left_out = ", ".join(f"{c[k]} {what}" for k, what in (("crowd", "crowd"), ("degenerate", "zero-size or outside"))
                             if c.get(k))
        text = (f"{self.json_path.name}: {len(self)} images, {c.get('boxes', 0)} boxes"
                + (f" ({left_out} left out)" if left_out else ""))
        if c.get("images_without_boxes"):
            text += f"; {c['images_without_boxes']} images without a usable box (background only)"
        if self.unused_categories:
            text += ("; categories without annotations (still a class of the model): "
                     + ", ".join(f"{i} {n!r}" for i, n in self.unused_categories))
        return text


def split_paths(data: dict, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) for `train` or `val` from the config's data section."""
    json_key, images_key = f"{split}_json", f"{split}_images"
    if data.get(json_key):
        return Path(data[json_key]), Path(data[images_key] or Path(data[json_key]).parent)
    if data.get("coco_root"):
        root = Path(data["coco_root"])
        return root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"
    raise UserError(f"no {split} data: set data.coco_root (a folder with {split}2017/ and annotations/) "
                    f"or data.{json_key} and data.{images_key}")


def read_json(path: Path) -> dict:
    if not path.is_file():
        hint = (f" (make the demo data with: python -m distill.demo_data {path.parent.parent} --preset demo)"
                if "demo" in str(path) else "")
        raise AnnotationError(f"annotation file not found: {path}{hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise AnnotationError(f"{path} is not a COCO detection file: it needs lists 'images', 'annotations' "
                              "and 'categories'")
    return data


def _bad_box(bbox) -> str | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return f"bbox {bbox!r} is not 4 finite numbers [x, y, width, height]"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox {bbox!r} has a negative width or height"
    return None


def load_coco(json_path, image_root, category_ids: list[int] | None = None) -> CocoSplit:
    """Read and check a COCO file. With `category_ids` (the training split's), the categories must match."""
    json_path, image_root = Path(json_path), Path(image_root)
    data = read_json(json_path)
    errors: list[str] = []
    categories = sorted(data["categories"], key=lambda c: c.get("id", -1))
    cat_ids = [c.get("id") for c in categories]
    if not cat_ids or len(set(cat_ids)) != len(cat_ids) or not all(isinstance(i, int) for i in cat_ids):
        raise AnnotationError(f"{json_path}: categories need unique integer ids, got {cat_ids[:10]}")
    if category_ids is not None and cat_ids != list(category_ids):
        raise AnnotationError(f"{json_path}: category ids {cat_ids} differ from the training set's {list(category_ids)}")
    label_of = {cid: i + 1 for i, cid in enumerate(cat_ids)}

    index_of, paths, image_ids, sizes = {}, [], [], []
    for img in data["images"]:
        iid, name = img.get("id"), img.get("file_name")
        if not isinstance(iid, int) or not isinstance(name, str) or iid in index_of:
            errors.append(f"image id {iid!r}: needs a unique integer 'id' and a 'file_name'")
            continue
        path = image_root / name
        if not path.is_file():
            errors.append(f"image id {iid}: file {name!r} not found under {image_root}")
        index_of[iid] = len(image_ids)
        image_ids.append(iid)
        paths.append(path)
        sizes.append((img.get("width") or math.inf, img.get("height") or math.inf))

    boxes = [[] for _ in image_ids]
    labels = [[] for _ in image_ids]
    counts = dict(annotations=len(data["annotations"]), crowd=0, degenerate=0)
    used_categories = set()
    for ann in data["annotations"]:
        aid, iid, cid = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        problem = ("image_id {!r} is not in 'images'".format(iid) if iid not in index_of else
                   f"category_id {cid!r} is not in 'categories' ({cat_ids[:10]}...)" if cid not in label_of else
                   _bad_box(ann.get("bbox")))
        if problem:
            errors.append(f"annotation id {aid!r}: {problem}")
            continue
        used_categories.add(cid)
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        i = index_of[iid]
        x, y, w, h = ann["bbox"]
        width, height = sizes[i]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:   # zero-size (or outside the image) boxes cannot be trained on
            boxes[i].append((x0, y0, x1, y1))
            labels[i].append(label_of[cid])
        else:
            counts["degenerate"] += 1

    if errors:
        more = f" (+{len(errors) - MAX_LISTED_ERRORS} more)" if len(errors) > MAX_LISTED_ERRORS else ""
        raise AnnotationError(f"{json_path}: {len(errors)} problem(s), fix them before training:\n  "
                              + "\n  ".join(errors[:MAX_LISTED_ERRORS]) + more)
    counts.update(boxes=sum(map(len, boxes)), images_without_boxes=sum(not b for b in boxes))
    if image_ids and counts["boxes"] == 0:
        raise AnnotationError(
            f"{json_path}: no usable box in {len(image_ids)} images ({counts['annotations']} annotations: "
            f"{counts['crowd']} iscrowd, {counts['degenerate']} of zero size or outside the image); "
            "training would learn nothing and AP would be 0. Crowd boxes are never trained on: set iscrowd 0 "
            "on the boxes that mark single objects")
    if not image_ids:
        raise AnnotationError(f"{json_path}: 'images' is empty")
    names = [str(c.get("name", c["id"])) for c in categories]
    unused = [(cid, name) for cid, name in zip(cat_ids, names) if cid not in used_categories]
    return CocoSplit(json_path, image_root, image_ids, paths,
                     [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes],
                     [np.asarray(lab, np.int64) for lab in labels],
                     cat_ids, names, counts, unused)


def read_image(path) -> torch.Tensor:
    """uint8 RGB (3, H, W), EXIF orientation applied (detectron2 read_image), through the project's one
    decoder (16-bit scaled, not clipped). Raises UnreadableImage, an OSError, for anything that does not
    decode, a decompression bomb included."""
    return load_rgb(path, exif_transpose=True, tensor=True).contiguous()


class DetectionDataset(Dataset):
    """Items are an index or (index, hflip). A file that does not decode gives image None (skipped, counted)."""

    def __init__(self, split: CocoSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        target = dict(boxes=torch.from_numpy(self.split.boxes[index]), labels=torch.from_numpy(self.split.labels[index]),
                      image_id=torch.tensor(self.split.image_ids[index]))
        try:
            image = read_image(self.split.paths[index])
        except (OSError, ValueError):
            return None, target, str(self.split.paths[index])
        height, width = image.shape[-2:]
        boxes = target["boxes"].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        if flip:
            image = image.flip(-1)
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target.update(boxes=boxes[keep], labels=target["labels"][keep])
        return image, target, None


def collate(batch):
    """(images, targets, paths of images that failed to decode)."""
    kept = [(im, t) for im, t, bad in batch if bad is None]
    return [im for im, _ in kept], [t for _, t in kept], [bad for _, _, bad in batch if bad is not None]


class TrainSampler(Sampler):
    """Endless stream of (index, hflip) for one rank: epoch e is a permutation seeded by (seed, e), padded
    to a multiple of world_size and dealt round-robin. `start` skips that many items of this rank's stream,
    so a resumed run sees exactly the images the uninterrupted run would have."""

    def __init__(self, size: int, seed: int = 0, hflip: float = 0.5, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.size, self.seed, self.hflip = size, seed, hflip
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_rank = math.ceil(size / world_size)

    def epoch_items(self, epoch: int) -> list[tuple[int, bool]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.size, generator=g)
        flips = torch.rand(self.size, generator=g) < self.hflip
        order = torch.arange(self.per_rank * self.world_size) % self.size   # pad by wrapping around
        mine = order[self.rank::self.world_size]
        return [(int(perm[i]), bool(flips[perm[i]])) for i in mine]

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_items(epoch)[offset:]
            epoch, offset = epoch + 1, 0


def train_loader(split: CocoSplit, batch_per_rank: int, workers: int, sampler: TrainSampler) -> DataLoader:
    # Own generator: building the loader must not draw from the global RNG (exact resume).
    return DataLoader(DetectionDataset(split), batch_size=batch_per_rank, sampler=sampler, collate_fn=collate,
                      num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator())


def eval_loader(split: CocoSplit, batch_per_rank: int, workers: int, dist: DistInfo) -> DataLoader:
    """This rank's share of the images, in order (rank, rank + world_size, ...)."""
    return sharded_eval_loader(DetectionDataset(split), batch_per_rank, workers, dist, collate=collate)