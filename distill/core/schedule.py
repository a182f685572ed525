"""Learning-rate schedules stepped per iteration, as LambdaLR factors.

LambdaLR multiplies each group's initial lr by the same factor, so per-stage multipliers keep their ratios.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from distill.core.errors import UserError


def scale_lr(base_lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): lr grows with the global batch size."""
    return base_lr * global_batch / base_batch


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, warmup_factor: float = 0.0,
                         min_factor: float = 0.0) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_step_factor(step: int, warmup_steps: int, milestones, gamma: float, warmup_factor: float) -> float:
    factor = gamma ** sum(step >= m for m in milestones)
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        factor *= warmup_factor * (1 - alpha) + alpha  # detectron2 linear warmup
    return factor


def build_scheduler(optimizer: Optimizer, kind: str = "cosine", total_steps: int = 1, warmup_steps: int = 0,
                    milestones=(), gamma: float = 0.1, warmup_factor: float = 0.001,
                    min_factor: float = 0.0) -> LambdaLR:
    """`cosine`: linear warmup from warmup_factor, then cosine to min_factor at total_steps.
    `step`: linear warmup, then multiply by gamma at each milestone (iterations)."""
    if kind == "cosine":
        def factor(step):
            return warmup_cosine_factor(step, total_steps, warmup_steps, warmup_factor, min_factor)
    elif kind == "step":
        milestones = sorted(int(m) for m in milestones)

        def factor(step):
            return warmup_step_factor(step, warmup_steps, milestones, gamma, warmup_factor)
    else:
        raise UserError(f"unknown lr schedule {kind!r}; expected 'cosine' or 'step'")
    return LambdaLR(optimizer, factor)
