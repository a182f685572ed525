"""Image decoding and the classification transforms every trainer shares.

`load_rgb` is the one decoder: every failure to decode (truncated file, not an image, a decompression
bomb, a missing file) becomes `UnreadableImage`, so datasets return `Skipped` in its place,
`collate_skipping` drops it, and the trainer counts and reports it. High-bit-depth greyscale
(16-bit PNG/TIFF) is scaled to 8 bits rather than clipped.

The transforms decode as well as transform (`transform.load(path_or_bytes)`): the random-resized crop
is drawn from the header's size first, so a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
that still gives the crop at least the output resolution. Crops and flips draw from torch's RNG exactly
as torchvision's RandomResizedCrop + RandomHorizontalFlip do, so the crop distribution is theirs.
`output="uint8"` keeps batches uint8 until the device (`normalize_on_device` finishes the job there).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; PIL decodes when it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = ImageReadMode = None

from distill.core.errors import UserError

DRAFT_SCALES = (8, 4, 2)        # libjpeg's DCT-domain reductions that PIL's draft() exposes
OUTPUTS = ("float", "uint8")
TENSOR_RESIZE = (T.InterpolationMode.NEAREST_EXACT, T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC)


class UnreadableImage(OSError):
    pass


def _describe(src) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _open(src):
    return Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with 16/32-bit greyscale scaled to 0..255 (PIL's convert clips it: a ramp reads nearly white)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        a = np.asarray(im, dtype=np.float64 if im.mode == "I" else np.uint32)
        if im.mode == "I":  # 32-bit ints: 16-bit data (PNG/TIFF) in practice; wider values clip
            a = np.clip(a, 0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0   # 0..1 floats, else already 0..255
        im = Image.fromarray(np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_rgb(src, *, exif_transpose: bool = False, tensor: bool = False, draft=None, name=None):
    """Decode a file (path or bytes) to a loaded RGB PIL image, or with `tensor` a uint8 (3, H, W) tensor.

    `exif_transpose` applies the EXIF orientation (detection boxes are drawn on the upright image);
    `draft` is a callable (width, height) -> (w, h) requested size for JPEG DCT scaling, or None;
    `name` names the image in the error when `src` is its bytes.
    Raises UnreadableImage, an OSError, for anything PIL cannot decode, DecompressionBombError included.
    """
    try:
        with _open(src) as im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft(*im.size))
            im.load()  # truncated files fail here, not later inside a transform
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            rgb = to_rgb(im)
            rgb.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UnreadableImage(f"{_describe(src if name is None else name)}: {type(e).__name__}: {e}") from None
    return pil_to_uint8(rgb) if tensor else rgb


def pil_to_uint8(im: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 view of an RGB image's pixels (one copy, no float conversion)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def normalize_on_device(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float normalised, the arithmetic of ToTensor + Normalize (bit-equal on CPU)."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)   # in place on the one new float tensor


@dataclass(frozen=True)
class Skipped:
    """Stands in for an image that could not be read; `collate_skipping` drops it and reports `where`."""
    where: str
    reason: str


def _resample(interpolation: str):
    try:
        return T.InterpolationMode(interpolation), Image.Resampling[interpolation.upper()]
    except (ValueError, KeyError):
        raise UserError(f"unknown interpolation {interpolation!r}; expected nearest, bilinear, bicubic, "
                        "box, hamming or lanczos") from None


class _Finish:
    """The tail every transform shares: RGB PIL image -> uint8 tensor, or float normalised (ToTensor math)."""

    def __init__(self, mean, std, output: str):
        if output not in OUTPUTS:
            raise UserError(f"transform output {output!r}; expected one of {', '.join(OUTPUTS)}")
        self.mean, self.std, self.output = tuple(mean), tuple(std), output

    def finish(self, im: Image.Image) -> torch.Tensor:
        return self.finish_tensor(pil_to_uint8(im))

    def finish_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "uint8":
            return x
        return normalize_on_device(x.unsqueeze(0), self.mean, self.std)[0]


class RandomCropTransform(_Finish):
    """RandomResizedCrop + optional horizontal flip + normalise, decoding JPEGs at a reduced DCT scale.

    The box is drawn by torchvision's own `RandomResizedCrop.get_params` on the full-size image, then the
    flip coin, in that order: under one torch seed the boxes and flips are torchvision's. `draft=False`
    (or a non-JPEG) gives torchvision's pixels exactly; with draft the crop is resampled from the
    DCT-reduced image, which keeps at least `size` pixels across the crop.
    """

    def __init__(self, size: int, mean, std, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True,
                 interpolation: str = "bilinear", output: str = "float", draft: bool = True):
        super().__init__(mean, std, output)
        self.size, self.scale, self.ratio, self.hflip, self.draft = int(size), tuple(scale), tuple(ratio), hflip, draft
        self.interpolation, self.resample = _resample(interpolation)

    def sample(self, width: int, height: int):
        """(top, left, h, w) box on the full-size image and the flip, drawn as torchvision draws them."""
        shape_only = torch.empty(1, dtype=torch.uint8).expand(3, height, width)  # get_params reads the size
        top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        flip = bool(self.hflip and torch.rand(1) < 0.5)
        return (top, left, h, w), flip

    def draft_factor(self, h: int, w: int) -> int:
        """The largest DCT reduction that keeps the crop at least `size` pixels on its shorter side."""
        if not self.draft:
            return 1
        return next((d for d in DRAFT_SCALES if min(h, w) >= d * self.size), 1)

    def _crop(self, image, box, full_size, flip) -> torch.Tensor:
        """Crop and resize a PIL image or uint8 tensor. Tensors resize with torchvision's antialiased uint8
        kernel (within 1 grey level of PIL's, about 3x faster); interpolations it lacks go through PIL."""
        top, left, h, w = box
        width, height = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
        sx, sy = width / full_size[0], height / full_size[1]   # 1 unless decoded at a DCT scale
        x0, y0 = round(left * sx), round(top * sy)
        x1, y1 = max(x0 + 1, round((left + w) * sx)), max(y0 + 1, round((top + h) * sy))
        if self.interpolation in TENSOR_RESIZE:
            x = image if isinstance(image, torch.Tensor) else pil_to_uint8(image)
            out = TF.resize(x[:, y0:y1, x0:x1], [self.size, self.size], interpolation=self.interpolation,
                            antialias=True)
            return self.finish_tensor(out.flip(-1) if flip else out)
        if isinstance(image, torch.Tensor):
            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        out = image.crop((x0, y0, x1, y1)).resize((self.size, self.size), self.resample)
        return self.finish(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        """An already decoded image (torchvision-style callers)."""
        box, flip = self.sample(*im.size)
        return self._crop(to_rgb(im), box, im.size, flip)

    def load(self, src) -> torch.Tensor:
        """Decode and transform in one go. The box is drawn from the JPEG header first: a crop that allows
        it decodes at a DCT scale (PIL draft), any other JPEG straight to a uint8 tensor (libjpeg-turbo
        through torchvision, the same pixels as PIL without the copy out of PIL); other formats via PIL."""
        return self.load_drawn(src)[0]

    def load_drawn(self, src, drawn=None):
        """(image, box, flip): `load` plus the box and flip it drew; given `drawn` = (box, flip), that crop
        instead of a new draw, decoded the same way, so a recorded crop replays to the same pixels
        (distill.label_cache)."""
        data = read_bytes(src)
        size = jpeg_size(data)
        if size is None:
            im = load_rgb(data, name=src)
            box, flip = self.sample(*im.size) if drawn is None else drawn
            return self._crop(im, box, im.size, flip), box, flip
        check_pixels(size, src)
        box, flip = self.sample(*size) if drawn is None else drawn
        factor = self.draft_factor(box[2], box[3])
        if factor == 1 and decode_jpeg is not None and self.interpolation in TENSOR_RESIZE:
            x = decode_jpeg_uint8(data, src)
            return self._crop(x, box, (x.shape[-1], x.shape[-2]), flip), box, flip
        im = load_rgb(data, name=src, draft=lambda w, h: (-(-w // factor), -(-h // factor)))
        return self._crop(im, box, size, flip), box, flip


def read_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    try:
        with open(src, "rb") as f:
            return f.read()
    except OSError as e:
        raise UnreadableImage(f"{src}: {type(e).__name__}: {e}") from None


def jpeg_size(data: bytes):
    """(width, height) from a baseline/progressive JPEG's frame header, or None if `data` is not a JPEG.
    Reading it ourselves costs microseconds; PIL's open costs a good share of a decode."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 9 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:          # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            return (width, height) if width and height else None
        pos += 2 + length
    return None


def check_pixels(size, src) -> None:
    """PIL's decompression-bomb limit, for the decoders that do not go through PIL."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > 2 * limit:
        raise UnreadableImage(f"{_describe(src)}: DecompressionBombError: image size ({size[0] * size[1]} pixels) "
                              f"exceeds limit of {2 * limit} pixels, could be decompression bomb DOS attack")


def decode_jpeg_uint8(data: bytes, src="<bytes>", device="cpu") -> torch.Tensor:
    """(3, H, W) uint8 RGB from JPEG bytes via torchvision (libjpeg-turbo on CPU, nvJPEG on "cuda")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               device=device)
    except RuntimeError as e:
        raise UnreadableImage(f"{_describe(src)}: {str(e).splitlines()[-1]}") from None


class TestTransform(_Finish):
    """Resize the shorter side to size / crop_pct, centre crop `size`: torchvision's pixels exactly."""

    def __init__(self, size: int, mean, std, crop_pct: float = 0.875, interpolation: str = "bilinear",
                 output: str = "float"):
        super().__init__(mean, std, output)
        self.size, self.resize = int(size), int(round(size / crop_pct))
        self.interpolation, _ = _resample(interpolation)
        self.ops = T.Compose([T.Resize(self.resize, interpolation=self.interpolation), T.CenterCrop(self.size)])

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return self.finish(self.ops(to_rgb(im)))

    def load(self, src) -> torch.Tensor:
        return self(load_rgb(src))


INCEPTION_AREA = (0.05, 1.0)   # Beyer et al.'s inception crop: 5-100% of the area


def crop_area(kind: str, scale) -> tuple:
    """The RandomResizedCrop area range an augmentation draws from: `scale` for random_crop, fixed for inception."""
    return tuple(scale) if kind == "random_crop" else INCEPTION_AREA


def build_transform(kind: str, size: int, mean, std, crop_pct: float = 0.875, scale=(0.08, 1.0),
                    hflip: bool = True, interpolation: str = "bilinear", output: str = "float",
                    draft: bool = True):
    """`random_crop` (PaddleClas RandCropImage + flip), `inception` (area 5-100%, Beyer et al.),
    or `test` (resize to size/crop_pct, centre crop: evaluation, and FixRes fine-tuning).

    Callable on a PIL image like a torchvision transform; `load_transformed` decodes through it."""
    if kind == "test":
        return TestTransform(size, mean, std, crop_pct, interpolation, output)
    if kind in ("random_crop", "inception"):
        scale = crop_area(kind, scale)
        return RandomCropTransform(size, mean, std, scale, hflip=hflip, interpolation=interpolation,
                                   output=output, draft=draft)
    raise UserError(f"unknown augmentation {kind!r}; expected random_crop, inception or test")


def load_transformed(src, transform):
    """Decode `src` (path or bytes) and transform it, through the transform's own decoder when it has one
    (reduced-size JPEG decoding). Raises UnreadableImage."""
    load = getattr(transform, "load", None)
    if load is not None:
        return load(src)
    return transform(load_rgb(src))


class ListDataset(Dataset):
    """(path, label) pairs -> (tensor, label); an unreadable image yields `Skipped` instead of raising."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            return load_transformed(path, self.transform), label
        except UnreadableImage as e:
            return Skipped(path, str(e))


def collate_skipping(batch):
    """Default collation of the readable items -> (images, labels, skipped) with `skipped` a list of `Skipped`."""
    skipped = [b for b in batch if isinstance(b, Skipped)]
    good = [b for b in batch if not isinstance(b, Skipped)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([g[1] for g in good], dtype=torch.long)
    return images, labels, skipped
