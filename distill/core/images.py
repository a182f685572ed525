"""Image decoding and the classification transforms every trainer shares.

An image that cannot be decoded never crashes a run: datasets return `Skipped` in its place and
`collate_skipping` drops it, so the trainer can count and report it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from distill.core.errors import UserError


class UnreadableImage(OSError):
    pass


def load_rgb(path_or_bytes) -> Image.Image:
    """Decode an image file (or its bytes) to a fully loaded RGB PIL image; UnreadableImage if it is not one."""
    try:
        src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
        with Image.open(src) as im:
            im.load()  # truncated files fail here, not later inside a transform
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        name = "<bytes>" if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
        raise UnreadableImage(f"{name}: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class Skipped:
    """Stands in for an image that could not be read; `collate_skipping` drops it and reports `where`."""
    where: str
    reason: str


def build_transform(kind: str, size: int, mean, std, crop_pct: float = 0.875, scale=(0.08, 1.0),
                    hflip: bool = True, interpolation: str = "bilinear"):
    """`random_crop` (PaddleClas RandCropImage + flip), `inception` (area 5-100%, Beyer et al.),
    or `test` (resize to size/crop_pct, centre crop: evaluation, and FixRes fine-tuning)."""
    interp = T.InterpolationMode(interpolation)
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if kind == "test":
        return T.Compose([T.Resize(int(round(size / crop_pct)), interpolation=interp), T.CenterCrop(size), *tail])
    if kind in ("random_crop", "inception"):
        scale = tuple(scale) if kind == "random_crop" else (0.05, 1.0)
        flip = [T.RandomHorizontalFlip()] if hflip else []
        return T.Compose([T.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=interp),
                          *flip, *tail])
    raise UserError(f"unknown augmentation {kind!r}; expected random_crop, inception or test")


class ListDataset(Dataset):
    """(path, label) pairs -> (tensor, label); an unreadable image yields `Skipped` instead of raising."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except UnreadableImage as e:
            return Skipped(path, str(e))
        return self.transform(image), label


def collate_skipping(batch):
    """Default collation of the readable items -> (images, labels, skipped) with `skipped` a list of `Skipped`."""
    skipped = [b for b in batch if isinstance(b, Skipped)]
    good = [b for b in batch if not isinstance(b, Skipped)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([g[1] for g in good], dtype=torch.long)
    return images, labels, skipped


