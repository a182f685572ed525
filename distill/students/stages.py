"""Per-stage learning-rate multipliers with PaddleClas's exact semantics (DESIGN.md).

Every parameter is assigned to stage 0..4 or to the head. `stage_param_groups` turns a 5-entry multiplier
list into torch optimizer parameter groups (lr = base_lr * multiplier); a multiplier of 0 freezes the stage.
Each group carries `lr_mult`, so a scheduler that scales every group by one factor keeps the ratios.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch.nn as nn
from timm.models import group_parameters

from distill.core.errors import UserError

HEAD = None  # stage id of the classifier / head parameters
NUM_STAGES = 5
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)

# What each family calls its five stages, for messages and the artifact's stage layout.
LAYOUT_HELP = {
    "resnet": "[stem, stage1, stage2, stage3, stage4] (e.g. 0.1,0.1,0.2,0.2,0.3)",
    "mobilenetv3": "[stem+blocks 0-2, blocks 3-5, blocks 6-8, blocks 9-11, blocks 12-14+last conv] "
                   "(large; small groups blocks by 2), e.g. 0.25,0.25,0.5,0.5,0.75",
    "generic": "[stem, then timm's block groups split into 4 in order] (e.g. 1,1,1,1,1)",
}


def parse_multipliers(value, family: str = "generic") -> list[float]:
    """Accept '0.1,0.1,0.2,0.2,0.3' or a sequence; exactly 5 non-negative numbers."""
    expected = f"expected 5 non-negative numbers for {LAYOUT_HELP.get(family, LAYOUT_HELP['generic'])}"
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or len(items) != NUM_STAGES:
        raise UserError(f"multiplier list {value!r} has the wrong length; {expected}")
    out = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            m = float(item)
        except (TypeError, ValueError):
            raise UserError(f"multiplier {item!r} in {value!r} is not a number; {expected}") from None
        if not math.isfinite(m) or m < 0:
            raise UserError(f"multiplier {item!r} in {value!r} is negative or not finite; {expected}")
        out.append(m)
    return out


def _resnet_stage(name: str):
    if re.match(r"(conv1|bn1)\.", name):
        return 0
    m = re.match(r"layer(\d)\.", name)
    return int(m.group(1)) if m else HEAD


def _mobilenetv3_stages(model: nn.Module) -> dict[str, int | None]:
    """PaddleClas: stem -> 0; inverted-residual block i -> min(i // k, 4) with k = 3 (large) or 2 (small);
    the last 1x1 conv (960/576 ch) -> 4; conv_head and classifier -> head."""
    blocks = [f"blocks.{i}.{j}." for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    last_conv, residual_blocks = blocks[-1], blocks[:-1]
    per_stage = 3 if len(residual_blocks) >= 15 else 2
    prefix_stage = {p: min(i // per_stage, 4) for i, p in enumerate(residual_blocks)}
    prefix_stage[last_conv] = 4
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith(("conv_stem.", "bn1.")):
            out[name] = 0
        elif name.startswith("blocks."):
            out[name] = prefix_stage[next(p for p in prefix_stage if name.startswith(p))]
        else:
            out[name] = HEAD
    return out


def _generic_stages(model: nn.Module) -> dict[str, int | None]:
    """timm group_matcher(coarse): first group -> stem; the other groups in order, split evenly into 4;
    the classifier -> head."""
    head = {f"{n}" for n, _ in _classifier_params(model)}
    groups = group_parameters(model, model.group_matcher(coarse=True))
    ids = sorted(groups)
    body_ids = [g for g in ids[1:] if not set(groups[g]) <= head]
    stage_of_group = {ids[0]: 0}
    for rank, g in enumerate(body_ids):
        stage_of_group[g] = 1 + (4 * rank) // max(len(body_ids), 1)
    out = {}
    for g, names in groups.items():
        for n in names:
            out[n] = HEAD if n in head else stage_of_group.get(g, 4)
    return out


def _classifier_params(model: nn.Module):
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Module):
        return []
    ids = {id(p) for p in classifier.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def param_stages(model: nn.Module, family: str) -> dict[str, int | None]:
    """Map every parameter name to its stage (0..4) or HEAD."""
    if family == "resnet":
        return {n: _resnet_stage(n) for n, _ in model.named_parameters()}
    if family == "mobilenetv3":
        return _mobilenetv3_stages(model)
    if family == "generic":
        return _generic_stages(model)
    raise UserError(f"unknown stage family {family!r}; expected resnet, mobilenetv3 or generic")


def norm_param_names(model: nn.Module) -> set[str]:
    return {f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, mod in model.named_modules() if isinstance(mod, NORM_TYPES)
            for p_name, _ in mod.named_parameters(recurse=False)}


def stage_layout(model: nn.Module, family: str) -> list[str]:
    """Human-readable: which top-level modules each of the 5 stages holds (for tables and artifacts)."""
    stages = param_stages(model, family)
    layout = []
    for s in range(NUM_STAGES):
        prefixes = []
        for name, stage in stages.items():
            if stage == s:
                parts = name.split(".")
                prefix = ".".join(parts[:3] if parts[0] == "blocks" else parts[:1])
                if prefix not in prefixes:
                    prefixes.append(prefix)
        layout.append(_compress(prefixes))
    return layout


def _compress(prefixes: list[str]) -> str:
    if len(prefixes) > 2 and all(p.startswith("blocks.") for p in prefixes):
        return f"{prefixes[0]}..{prefixes[-1]}"
    return ",".join(prefixes) or "-"


def stage_param_groups(model: nn.Module, multipliers, lr: float, weight_decay: float,
                       head_mult: float = 1.0, family: str = "generic") -> list[dict]:
    """Optimizer parameter groups, PaddleClas semantics.

    resnet: BN weight/bias are multiplied and decayed like the convs (PaddleClas default).
    mobilenetv3: BN weight/bias keep lr 1.0 and get no decay; SE weights are multiplied.
    generic: norm parameters and biases get no decay (timm's convention), all multiplied.
    A zero multiplier sets requires_grad False on that stage; frozen parameters are left out of the groups.
    """
    mults = parse_multipliers(multipliers, family)
    stages = param_stages(model, family)
    norms = norm_param_names(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        stage = stages[name]
        mult = head_mult if stage is HEAD else mults[stage]
        if mult == 0:  # a frozen stage freezes everything in it, norms included
            p.requires_grad_(False)
            continue
        decay = weight_decay
        if family == "mobilenetv3" and name in norms:
            mult, decay = (mult if stage is HEAD else 1.0), 0.0
        elif family == "generic" and (name in norms or p.ndim <= 1):
            decay = 0.0
        p.requires_grad_(True)
        label = "head" if stage is HEAD else f"stage{stage}"
        key = (label, mult, decay)
        if key not in groups:
            groups[key] = dict(params=[], names=[], lr=lr * mult, lr_mult=mult, weight_decay=decay,
                               name=f"{label}{'_no_decay' if decay == 0 and weight_decay else ''}")
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())
