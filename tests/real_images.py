"""Real images as an ImageFolder, for the chain's tests and measurements: scikit-learn's 1,797 handwritten
digit scans (UCI, 8x8 px, 16 grey levels), upscaled to 32 px PNGs, and off-topic crops of
scikit-image's bundled photographs for an unlabeled pool. No network.

    python tests/real_images.py OUT [--labeled 30] [--size 32]     # the measurement's folder (docs/benchmarks.md)

OUT/data/{train,val}/<digit>/*.png holds `labeled` scans per class in train and a fifth of the scans in val;
OUT/pool/ holds every other scan unlabeled, plus `photos` crops of real photographs (off-topic).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS = [str(d) for d in range(10)]
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "page", "text", "clock")


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """A 0..16 scan as a dark-on-light 8-bit image, bicubic-upscaled: what a scanner at `size` px would give."""
    grey = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")


def photo_crops(n: int, size: int, seed: int) -> list[Image.Image]:
    """n random square crops of scikit-image's bundled photographs (those that load offline)."""
    import skimage.data as sd

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        try:
            photos.append(np.asarray(getattr(sd, name)()))
        except Exception:   # some need a download (pooch): skipped offline
            continue
    if not photos:
        raise RuntimeError(f"none of scikit-image's photographs {PHOTOS} loads offline")
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        side = int(rng.integers(min(img.shape[:2]) // 6, min(img.shape[:2]) // 2))
        y, x = (int(rng.integers(0, img.shape[d] - side)) for d in (0, 1))
        crop = Image.fromarray(img[y:y + side, x:x + side]).convert("RGB")
        crops.append(crop.resize((size, size), Image.BICUBIC))
    return crops


def write_digits(out, *, classes: int = 10, labeled: int = 30, val_fraction: float = 0.2, pool: int | None = None,
                 photos: int = 0, size: int = 32, seed: int = 0) -> Path:
    """OUT/data (train: `labeled` per class, val: val_fraction of each class) and OUT/pool (`pool` unlabeled
    scans per class, default every scan left, plus `photos` off-topic photo crops). Same seed, same files."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c in range(classes):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_val = int(round(val_fraction * len(idx)))
        splits = {"val": idx[:n_val], "train": idx[n_val:n_val + labeled]}
        rest = idx[n_val + labeled:]
        splits["pool"] = rest if pool is None else rest[:pool]
        for split, chosen in splits.items():
            folder = out / "pool" if split == "pool" else out / "data" / split / DIGITS[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                digit_image(digits.images[i], size).save(folder / f"scan_{i:04d}.png")
    for i, crop in enumerate(photo_crops(photos, size, seed) if photos else []):
        crop.save(out / "pool" / f"photo_{i:04d}.png")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--labeled", type=int, default=30)
    p.add_argument("--photos", type=int, default=300)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_digits(a.out, labeled=a.labeled, photos=a.photos, size=a.size, seed=a.seed)
    print(f"wrote {a.out}/data (train/val) and {a.out}/pool")
