"""Mixed precision in one place: the names configs and CLIs use for autocast dtypes, and the context."""
from __future__ import annotations

import contextlib

import torch

# "none" and "off" both mean fp32 (the trainer's and the transfer configs' spelling).
AMP_DTYPES = {None: None, "none": None, "off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or a no-op context when dtype is None (fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()
