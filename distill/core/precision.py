"""Mixed precision in one place: the one vocabulary (`off | bf16 | fp16`), autocast, and the optimizer step.

A GradScaler exists only for fp16 (bf16 has fp32's exponent range and needs no loss scaling); every
trainer steps its optimizer through `Precision.step`, so scaling, unscaling before clipping and the
skipped-step logic live here and nowhere else.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import UserError

AMP_CHOICES = ("off", "bf16", "fp16")
# None and "none" are accepted as "off" from callers that pass an unset value.
AMP_DTYPES = {None: None, "none": None, "off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(value, key: str = "run.amp") -> str:
    """The canonical name, or a one-line error naming the key and the choices."""
    if value is False or value is None:
        return "off"
    if value not in AMP_DTYPES:
        raise UserError(f"{key}={value!r}; expected one of {' | '.join(AMP_CHOICES)}")
    return "off" if AMP_DTYPES[value] is None else value


def native_bf16(device) -> bool:
    """Whether bf16 matrix products run natively: CUDA, or a CPU whose oneDNN has bf16 kernels (AVX512-BF16,
    AMX). Elsewhere bf16 autocast is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)   # private, hence guarded
    return device.type == "cpu" and probe is not None and bool(probe())


def autocast(device_type: str, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or a no-op context when dtype is None (fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


class Precision:
    """Autocast for the forward pass and the backward + optimizer step, for one amp setting on one device."""

    def __init__(self, amp: str, device: torch.device):
        self.amp, self.device = check_amp(amp), torch.device(device)
        self.dtype = AMP_DTYPES[self.amp]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None

    def autocast(self):
        return autocast(self.device.type, self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad_norm: float = 0.0) -> None:
        """zero_grad, backward, optional global-norm clipping (on unscaled gradients), step."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(_params(optimizer), clip_grad_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(_params(optimizer), clip_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _params(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]
