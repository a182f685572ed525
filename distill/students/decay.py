"""Matched weight decay: reuse the student's pretraining decay downstream only when it means the same thing.

PaddleClas's L2 regularizer and torch SGD's `weight_decay` are *coupled*: `wd * w` is added to the gradient,
so momentum and the learning rate scale it. AdamW's decay is *decoupled*: `w -= lr * wd * w` outside the
adaptive step. The two numbers live on different scales (the demo's AdamW 0.05 is not an SGD L2 of 0.05),
and no rate-free conversion exists: equating the per-step shrink gives `wd_sgd = lr_adamw * wd_adamw *
(1 - momentum) / lr_sgd`, which depends on both runs' learning rates and schedules. So a decoupled value is
refused with a way out, never copied.
"""
from __future__ import annotations

from distill.core.errors import UserError

DEFAULT_WEIGHT_DECAY = 1e-4   # torchvision / detectron2 SGD default, when the student records none
COUPLED, DECOUPLED = "coupled", "decoupled"
KINDS = (COUPLED, DECOUPLED)
OPTIMIZER_KIND = {"sgd": COUPLED, "momentum": COUPLED, "adamw": DECOUPLED}  # how each optimizer applies its decay


def decay_kind(pretrain: dict) -> str | None:
    """The recorded kind; an artifact written before kinds were recorded is judged by its optimizer (SGD:
    coupled, AdamW: decoupled), and an unknown optimizer leaves the kind unknown."""
    kind = pretrain.get("weight_decay_kind")
    if kind is not None:
        if kind not in KINDS:
            raise UserError(f"artifact pretrain.weight_decay_kind is {kind!r}; expected one of {', '.join(KINDS)}")
        return kind
    return OPTIMIZER_KIND.get(str(pretrain.get("optimizer") or "").lower())


def matched_weight_decay(meta: dict, default: float = DEFAULT_WEIGHT_DECAY,
                         flag: str = "--weight-decay / optim.weight_decay") -> tuple[float, str]:
    """(value, note) for a consumer that trains with coupled L2 (SGD). `flag` names the consumer's override."""
    pretrain = meta.get("pretrain") or {}
    value = pretrain.get("weight_decay")
    name = meta.get("name") or meta.get("arch") or "the student"
    if value is None:
        return float(default), f"{default:g}: default, {name} records no pretraining weight decay"
    kind = decay_kind(pretrain)
    source = pretrain.get("weight_decay_source") or pretrain.get("source")
    if kind == COUPLED:
        return float(value), (f"{float(value):g}: matched to {name}'s pretraining L2 (coupled"
                              + (f"; {source})" if source else ")"))
    if kind == DECOUPLED:
        optimizer = pretrain.get("optimizer") or "AdamW"
        raise UserError(
            f"{name} was pretrained with decoupled weight decay {float(value):g} ({optimizer}), which is not an SGD "
            f"L2 coefficient and has no learning-rate-free equivalent; pass {flag} explicitly "
            f"(e.g. {default:g})")
    return float(default), (f"{default:g}: default, {name}'s recorded decay {float(value):g} has no kind and "
                            "no SGD optimizer on record, so it is not reused")


def weight_decay_for(given, meta: dict, default: float = DEFAULT_WEIGHT_DECAY,
                     flag: str = "--weight-decay / optim.weight_decay", given_by: str = "given") -> tuple[float, str]:
    """(value, note): the weight decay a consumer was given (`given_by` says where), else the one matched to
    the student's pretraining (`matched_weight_decay`). The one rule transfer, detection and the detectron2
    engine share."""
    if given is not None:
        return float(given), f"{float(given):g} ({given_by})"
    return matched_weight_decay(meta, default, flag)
