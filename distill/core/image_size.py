"""The data's own resolution, read from image headers: what a model with no pretrained resolution trains at.

A randomly initialised network has no resolution of its own, and timm's default (224 px for most archs)
upsamples 32 px scans 7x: 49x the compute for less accuracy (resnet18d, 8 epochs on 1,438 digit scans: 69.0%
at 224 px in the issue's measurement, 96.7% at 32 px here; docs/benchmarks.md). The typical size is the
median shorter side of an evenly spread sample of images; PIL reads a size from the header without decoding.
"""
from __future__ import annotations

import statistics

from PIL import Image

SAMPLE = 64
# At least 32 px: five stride-2 stages leave a 1x1 map there. At most 224 px: the ImageNet recipes' size;
# beyond it a CPU's cost grows with the square of the side for little gain on most photos.
MIN_SIZE, MAX_SIZE, STEP = 32, 224, 8


def spread(items, n: int) -> list:
    """n items evenly spaced over `items` (all when fewer): a sorted folder listing gives every class a say."""
    items = list(items)
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def image_size(item) -> tuple[int, int] | None:
    """(width, height) of a path (header only) or a PIL image; None when it does not open."""
    if isinstance(item, Image.Image):
        return item.size
    try:
        with Image.open(item) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def typical_image_size(items, sample: int = SAMPLE) -> tuple[int | None, int]:
    """(median shorter side in px, images read) over an evenly spread sample; (None, 0) if none opens."""
    sizes = [s for s in map(image_size, spread(items, sample)) if s is not None]
    if not sizes:
        return None, 0
    return int(statistics.median(min(s) for s in sizes)), len(sizes)


def own_resolution(items, sample: int = SAMPLE) -> tuple[int | None, str]:
    """(train resolution, why): the typical size rounded to a multiple of 8 within [32, 224]; (None, why)
    when no image opens (the caller keeps its default)."""
    typical, read = typical_image_size(items, sample)
    if typical is None:
        return None, "no sampled image could be read"
    size = min(MAX_SIZE, max(MIN_SIZE, int(round(typical / STEP)) * STEP))
    why = f"the data's own size: median shorter side {typical} px over {read} sampled images"
    if typical < MIN_SIZE:
        why += f", raised to {MIN_SIZE} px (the smallest a five-stage network resolves)"
    elif typical > MAX_SIZE:
        why += f", capped at {MAX_SIZE} px"
    return size, why
