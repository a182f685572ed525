"""The data's own resolution: median shorter side of an evenly spread sample, read from headers, rounded and
clamped; unreadable files are left out."""
import pytest
from PIL import Image

from distill.core.image_size import MAX_SIZE, MIN_SIZE, own_resolution, spread, typical_image_size


def write(folder, sizes):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"{i:03d}.png"
        Image.new("RGB", (w, h), (i, 0, 0)).save(path)
        paths.append(path)
    return paths


def test_typical_size_is_the_median_shorter_side_and_skips_unreadable_files(tmp_path):
    paths = write(tmp_path, [(40, 90), (100, 50), (300, 60), (64, 64), (200, 120)])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert typical_image_size([*paths, broken]) == (60, 5)   # shorter sides 40 50 60 64 120
    assert typical_image_size([broken]) == (None, 0)


def test_own_resolution_rounds_to_eight_and_clamps_with_the_reason(tmp_path):
    assert own_resolution(write(tmp_path / "a", [(101, 101)] * 3))[0] == 104
    small, why = own_resolution(write(tmp_path / "b", [(8, 8)] * 3))
    assert small == MIN_SIZE and "raised to 32 px" in why and "median shorter side 8 px over 3" in why
    big, why = own_resolution(write(tmp_path / "c", [(1000, 800)] * 2))
    assert big == MAX_SIZE and "capped at 224 px" in why
    assert own_resolution([tmp_path / "missing.png"]) == (None, "no sampled image could be read")


@pytest.mark.parametrize("n", [1, 2, 5, 100])
def test_spread_covers_both_ends_without_repeats(n):
    items = list(range(37))
    picked = spread(items, n)
    assert len(picked) == min(n, 37) and len(set(picked)) == len(picked) and picked[0] == 0
    assert n == 1 or picked[-1] == 36
