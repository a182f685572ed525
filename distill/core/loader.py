"""JPEG decoding on the GPU (nvJPEG through torchvision) behind a flag, for hosts whose CPUs cannot feed it.

DataLoader workers cannot touch CUDA, so the work is split: the worker draws the crop and flip (exactly
as `RandomCropTransform` does, same RNG calls) and ships the undecoded bytes with them; the main process
decodes the whole batch on the device, then crops, resizes and flips there. On the CPU the same path
gives the CPU pipeline's pixels exactly (the equivalence the tests check); nvJPEG's IDCT differs from
libjpeg-turbo's by a grey level or so. Non-JPEG files are decoded in the worker and shipped as pixels.

    transform = DeviceDecode(build_transform("random_crop", 224, mean, std, output="uint8"))
    stream = TrainStream(sources, transform, batch_size)          # items are EncodedCrop
    loader = DataLoader(stream, batch_size=..., collate_fn=collate_encoded)
    for crops, labels, skipped in loader:
        images, kept, bad = decode_crops(crops, 224, device="cuda")   # bad: Skipped, count them too
        images, labels = normalize_on_device(images, mean, std), labels[kept].cuda()
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from distill.core.errors import UserError
from distill.core.images import (TENSOR_RESIZE, RandomCropTransform, Skipped, UnreadableImage, check_pixels,
                                 decode_jpeg, decode_jpeg_uint8, jpeg_size, load_rgb, pil_to_uint8, read_bytes)


@dataclass
class EncodedCrop:
    """One training image before decoding: JPEG bytes (or decoded pixels) and the crop drawn for it."""
    data: torch.Tensor          # uint8: the file's bytes (1-D) or, for a non-JPEG, (3, H, W) pixels
    box: tuple                  # (top, left, h, w) on the full-size image
    flip: bool
    where: str


class DeviceDecode:
    """Wraps a RandomCropTransform: `load` draws the crop and returns an EncodedCrop, decoding nothing
    that nvJPEG can decode. `decode_crops` finishes the batch on the device."""

    def __init__(self, crop: RandomCropTransform):
        if not isinstance(crop, RandomCropTransform):
            raise UserError("GPU decoding needs the random_crop or inception augmentation")
        if crop.interpolation not in TENSOR_RESIZE:
            raise UserError(f"GPU decoding resizes on tensors: interpolation {crop.interpolation.value!r} "
                            "is not available there; use bilinear, bicubic or nearest-exact")
        if decode_jpeg is None:
            raise UserError("GPU decoding needs torchvision.io.decode_jpeg, which this torchvision lacks")
        self.crop = crop
        self.size, self.interpolation = crop.size, crop.interpolation

    def load(self, src) -> EncodedCrop:
        data = read_bytes(src)
        where = "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)
        size = jpeg_size(data)
        if size is None:
            pixels = pil_to_uint8(load_rgb(data, name=src))
            box, flip = self.crop.sample(pixels.shape[-1], pixels.shape[-2])
            return EncodedCrop(pixels, box, flip, str(where))
        check_pixels(size, src)
        box, flip = self.crop.sample(*size)
        return EncodedCrop(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip, str(where))

    def __call__(self, image):
        raise UserError("DeviceDecode transforms files, not decoded images: pass paths or bytes")


def collate_encoded(batch):
    """(list of EncodedCrop, labels, skipped): the batch stays undecoded until `decode_crops`."""
    skipped = [b for b in batch if isinstance(b, Skipped)]
    good = [b for b in batch if not isinstance(b, Skipped)]
    return [g[0] for g in good], torch.tensor([g[1] for g in good], dtype=torch.long), skipped


def decode_crops(crops, size: int, device="cuda", interpolation=TENSOR_RESIZE[1]):
    """(images, kept, skipped): images (K, 3, size, size) uint8 on `device`, the JPEGs decoded there in one
    batched call, each cropped, resized (antialiased) and flipped as drawn; `kept` the indices of the K
    crops that decoded (index the labels with it), `skipped` a Skipped per file that did not."""
    device = torch.device(device)
    jpeg = [i for i, c in enumerate(crops) if c.data.dim() == 1]
    decoded, skipped = {}, []
    if jpeg and device.type == "cuda":
        try:
            decoded = dict(zip(jpeg, decode_jpeg([crops[i].data for i in jpeg], mode=_rgb(), device=device)))
        except RuntimeError:   # one bad file fails the batched call: find it image by image
            decoded = {}
    for i in jpeg:
        if i not in decoded:
            try:
                decoded[i] = decode_jpeg_uint8(crops[i].data.numpy().tobytes(), crops[i].where, device)
            except UnreadableImage as e:
                skipped.append(Skipped(crops[i].where, str(e)))
    out, kept = [], []
    for i, c in enumerate(crops):
        if c.data.dim() == 1 and i not in decoded:
            continue
        x = decoded[i] if i in decoded else c.data.to(device, non_blocking=True)
        top, left, h, w = c.box
        x = TF.resize(x[:, top:top + h, left:left + w], [size, size], interpolation=interpolation, antialias=True)
        out.append(x.flip(-1) if c.flip else x)
        kept.append(i)
    images = torch.stack(out) if out else torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    return images, kept, skipped


def _rgb():
    from torchvision.io import ImageReadMode
    return ImageReadMode.RGB


__all__ = ["DeviceDecode", "EncodedCrop", "collate_encoded", "decode_crops", "UnreadableImage"]
