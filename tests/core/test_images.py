"""The one decoder (bombs, 16-bit, EXIF) and the decode-aware transforms against torchvision's."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from distill.core.images import (ListDataset, Skipped, UnreadableImage, build_transform, load_rgb,
                                 load_transformed, normalize_on_device)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LEVEL = 1 / 255 / min(STD)          # one grey level after normalisation


def png(width, height, bit_depth, colour_type, rows: bytes) -> bytes:
    """A PNG written by hand: lets a header claim any size without the pixels existing."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def photo_like(rng, width, height) -> Image.Image:
    """Smooth colour fields plus grain: decodes and resamples like a photograph, unlike flat test cards."""
    base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(im + rng.normal(0, 10, im.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        p = root / f"{i}.jpg"
        photo_like(rng, int(rng.integers(120, 200)), int(rng.integers(120, 200))).save(p, quality=90)
        paths.append(p)
    return paths


def test_decompression_bomb_is_unreadable_and_skipped(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(20000, 20000, 8, 0, b"\x00" * 20001))   # PIL refuses it at open: > 2x its pixel limit
    for kwargs in ({}, dict(tensor=True, exif_transpose=True)):
        with pytest.raises(UnreadableImage, match="DecompressionBomb"):
            load_rgb(bomb, **kwargs)
    assert isinstance(UnreadableImage("x"), OSError)    # callers catching OSError keep working
    item = ListDataset([(str(bomb), 0)], build_transform("random_crop", 32, MEAN, STD))[0]
    assert isinstance(item, Skipped) and "DecompressionBomb" in item.reason


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(">u2"), (4, 1))   # 0..65535 left to right
    path = tmp_path / "ramp16.png"
    path.write_bytes(png(256, 4, 16, 0, b"".join(b"\x00" + row.tobytes() for row in ramp)))
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (4, 256, 3)
    assert abs(rgb.mean() - 127.5) < 1.0                      # PIL's own convert reads ~254 (clipped)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, -1].tolist() == [255, 255, 255]
    assert np.all(np.diff(rgb[0, :, 0].astype(int)) >= 0)     # still a ramp
    wide = Image.fromarray(np.tile(np.linspace(0, 65535, 64), (4, 1)).astype(np.int32), "I")
    buf = io.BytesIO()
    wide.save(buf, format="TIFF")
    assert abs(np.asarray(load_rgb(buf.getvalue())).mean() - 127.5) < 2.0


def test_exif_orientation_and_uint8_tensor(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = im.getexif()
    exif[0x0112] = 6                                          # rotate 90 degrees clockwise to view
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif)
    assert load_rgb(path).size == (40, 20)
    upright = load_rgb(path, exif_transpose=True, tensor=True)
    assert upright.dtype == torch.uint8 and tuple(upright.shape) == (3, 40, 20)
    assert abs(upright[0].float().mean().item() - 200) < 4


def test_random_crop_draws_torchvisions_boxes_and_flips():
    ours = build_transform("random_crop", 32, MEAN, STD, scale=(0.08, 1.0))
    ref = T.RandomResizedCrop(32, scale=(0.08, 1.0))
    shape = torch.empty(3, 180, 250)
    torch.manual_seed(3)
    mine = [ours.sample(250, 180) for _ in range(500)]
    torch.manual_seed(3)
    theirs = [(ref.get_params(shape, ref.scale, ref.ratio), bool(torch.rand(1) < 0.5)) for _ in range(500)]
    assert mine == theirs
    flips = [f for _, f in mine]
    assert 0.4 < np.mean(flips) < 0.6


def test_random_crop_pixels_match_torchvision(jpegs):
    """No draft: torchvision's crop and flip, resampled within one grey level of PIL's. With draft (DCT
    scaling) the same crop, resampled from the reduced image: close on average, and the crop always keeps
    at least the output resolution."""
    size = 32
    ref = T.Compose([T.RandomResizedCrop(size, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(MEAN, STD)])
    exact = build_transform("random_crop", size, MEAN, STD, scale=(0.3, 1.0), draft=False)
    drafted = build_transform("random_crop", size, MEAN, STD, scale=(0.3, 1.0))
    reduced, errors = 0, []
    for seed, path in enumerate(jpegs * 3):
        torch.manual_seed(seed)
        expected = ref(Image.open(path).convert("RGB"))
        torch.manual_seed(seed)
        assert (exact.load(path) - expected).abs().max().item() <= LEVEL + 1e-6
        torch.manual_seed(seed)
        box, _ = drafted.sample(*Image.open(path).size)
        factor = drafted.draft_factor(box[2], box[3])
        assert min(box[2], box[3]) / factor >= size
        reduced += factor > 1
        torch.manual_seed(seed)
        errors.append((drafted.load(path) - expected).abs().mean().item())
    assert reduced >= 5                                  # the DCT path was exercised
    assert np.mean(errors) < 6 * LEVEL


def test_test_transform_is_torchvisions_pixels_exactly(jpegs):
    ref = T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])
    ours = build_transform("test", 32, MEAN, STD, crop_pct=32 / 37)
    for path in jpegs:
        image = Image.open(path).convert("RGB")
        assert torch.equal(ours.load(path), ref(image))
        assert torch.equal(ours(image), ref(image))


def test_uint8_output_normalised_on_device_equals_float_output(jpegs):
    as_float = build_transform("random_crop", 32, MEAN, STD)
    as_uint8 = build_transform("random_crop", 32, MEAN, STD, output="uint8")
    torch.manual_seed(0)
    a = torch.stack([load_transformed(p, as_float) for p in jpegs])
    torch.manual_seed(0)
    b = torch.stack([load_transformed(p, as_uint8) for p in jpegs])
    assert b.dtype == torch.uint8
    assert torch.equal(normalize_on_device(b, MEAN, STD), a)


def test_bad_transform_arguments_are_clear():
    from distill.core.errors import UserError
    with pytest.raises(UserError, match="interpolation"):
        build_transform("random_crop", 32, MEAN, STD, interpolation="cubic-ish")
    with pytest.raises(UserError, match="output"):
        build_transform("test", 32, MEAN, STD, output="half")


def device_decoded(paths, device, seed=0):
    from distill.core.loader import DeviceDecode, collate_encoded, decode_crops

    transform = DeviceDecode(build_transform("random_crop", 32, MEAN, STD, output="uint8", draft=False))
    torch.manual_seed(seed)
    crops, labels, skipped = collate_encoded([(load_transformed(p, transform), 0) for p in paths])
    return decode_crops(crops, 32, device=device)


def test_device_decode_path_on_cpu_gives_the_cpu_pipelines_pixels_exactly(jpegs, tmp_path):
    """The GPU-decoding path run on the CPU: same crops, same pixels as the in-worker pipeline; a corrupt
    JPEG is skipped with its name, the rest of the batch kept."""
    cpu = build_transform("random_crop", 32, MEAN, STD, output="uint8", draft=False)
    torch.manual_seed(0)
    expected = torch.stack([cpu.load(p) for p in jpegs])
    images, kept, skipped = device_decoded(jpegs, "cpu")
    assert kept == list(range(len(jpegs))) and not skipped
    assert torch.equal(images, expected)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpegs[0].read_bytes()[:400])
    images, kept, skipped = device_decoded([jpegs[1], broken, jpegs[2]], "cpu")
    assert kept == [0, 2] and len(images) == 2 and skipped[0].where == str(broken)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_device_decode_on_cuda_matches_the_cpu_path_within_a_grey_level_or_two(jpegs):
    cpu_images, _, _ = device_decoded(jpegs, "cpu")
    gpu_images, kept, _ = device_decoded(jpegs, "cuda")
    assert gpu_images.device.type == "cuda" and kept == list(range(len(jpegs)))
    diff = (gpu_images.cpu().int() - cpu_images.int()).abs().float()
    assert diff.mean() < 1.0 and diff.max() <= 16      # nvJPEG's IDCT and upsampling differ slightly
