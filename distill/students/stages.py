"""Per-stage learning-rate multipliers with the semantics of the Paddle code each family comes from.

Every parameter is assigned to stage 0..4 or to the head. `stage_param_groups` turns a 5-entry multiplier
list into torch optimizer parameter groups (lr = base_lr * multiplier); a multiplier of 0 freezes the stage.
Each group carries `lr_mult`, so a scheduler that scales every group by one factor keeps the ratios.
What each family follows:
- resnet: PaddleClas ResNet_vd `lr_mult_list` (stem, stage 1..4; BN multiplied and decayed like the convs).
- mobilenetv3: PaddleDetection 2.6 MobileNetV3 `lr_mult_list` (stem and blocks 0-2 -> [0], block i ->
  [min(i // 3, 4)], SE with its block, BN multiplied with no decay). Outside PaddleDetection's backbone,
  the 960/576 conv takes PaddleDetection's own extra-block rule (index len(blocks) -> [min(15 // 3, 4)] = [4]
  for large, [min(11 // 3, 4)] = [3] for small); the 1280 head conv and the classifier are the head.
- lcnet: PaddleClas PP-LCNet's 6-entry `lr_mult_list` with its first two entries (conv1, blocks2) as one:
  [conv1 + blocks2, blocks3, blocks4, blocks5, blocks6]; BN multiplied, no decay; head conv + fc: head.
- hgnetv2: PaddleClas PP-HGNetV2 `lr_mult_list` (stem, stages 0..3); BN multiplied, no decay; the learnable
  affine (lab) scale/bias learn at 0.01 x the multiplier, as PaddleClas's lab_lr.
- generic (any other timm model): timm's group_matcher; norms and biases get no decay (timm's convention).
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
LAB_LR = 0.01  # PaddleClas PP-HGNetV2 LearnableAffineBlock lab_lr

# What each family calls its five stages, for messages and the artifact's stage layout.
LAYOUT_HELP = {
    "resnet": "[stem, stage1, stage2, stage3, stage4] (e.g. 0.1,0.1,0.2,0.2,0.3)",
    "mobilenetv3": "[stem+blocks 0-2, blocks 3-5, blocks 6-8, blocks 9-11, blocks 12-14] with the 960/576 conv "
                   "in the last used entry (PaddleDetection: block i -> min(i // 3, 4); small has 11 blocks, so "
                   "its entry [4] is unused), e.g. 0.25,0.25,0.5,0.5,0.75",
    "lcnet": "[conv1+blocks2, blocks3, blocks4, blocks5, blocks6] (PP-LCNet), e.g. 0.25,0.25,0.5,0.5,0.75",
    "hgnetv2": "[stem, stage1, stage2, stage3, stage4] (PP-HGNetV2), e.g. 0.25,0.25,0.5,0.5,0.75",
    "generic": "[stem, then timm's block groups split into 4 in order] (e.g. 1,1,1,1,1)",
}
# Families whose norm weight/bias get no weight decay (Paddle: BN ParamAttr regularizer L2Decay(0)).
NO_NORM_DECAY = {"mobilenetv3", "lcnet", "hgnetv2"}


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


def _flat_blocks(model: nn.Module) -> list[str]:
    return [f"blocks.{i}.{j}." for i, stage in enumerate(model.blocks) for j in range(len(stage))]


def _by_prefix(model: nn.Module, stem: tuple, prefix_stage: dict) -> dict[str, int | None]:
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith(stem):
            out[name] = 0
        else:
            out[name] = next((s for p, s in prefix_stage.items() if name.startswith(p)), HEAD)
    return out


def _mobilenetv3_stages(model: nn.Module) -> dict[str, int | None]:
    """PaddleDetection: stem -> 0; inverted-residual block i -> min(i // 3, 4); the 960/576 1x1 conv, its
    extra-block index len(blocks) -> min(len // 3, 4); conv_head and classifier -> head."""
    blocks = _flat_blocks(model)
    return _by_prefix(model, ("conv_stem.", "bn1."), {p: min(i // 3, 4) for i, p in enumerate(blocks)})


_LCNET_STAGE_OF_BLOCK = (0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4)  # blocks2 | blocks3 | blocks4 | blocks5 | blocks6


def _lcnet_stages(model: nn.Module) -> dict[str, int | None]:
    blocks = _flat_blocks(model)
    if len(blocks) != len(_LCNET_STAGE_OF_BLOCK):
        raise UserError(f"stage family 'lcnet' expects PP-LCNet's 13 blocks, this model has {len(blocks)}")
    return _by_prefix(model, ("conv_stem.", "bn1."), dict(zip(blocks, _LCNET_STAGE_OF_BLOCK)))


def _hgnetv2_stages(model: nn.Module) -> dict[str, int | None]:
    return _by_prefix(model, ("stem.",), {f"stages.{i}.": i + 1 for i in range(4)})


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
    if family in _STAGE_RULES:
        return _STAGE_RULES[family](model)
    raise UserError(f"unknown stage family {family!r}; expected one of {', '.join(LAYOUT_HELP)}")


_STAGE_RULES = {"mobilenetv3": _mobilenetv3_stages, "lcnet": _lcnet_stages, "hgnetv2": _hgnetv2_stages,
                "generic": _generic_stages}


def norm_param_names(model: nn.Module) -> set[str]:
    return {f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, mod in model.named_modules() if isinstance(mod, NORM_TYPES)
            for p_name, _ in mod.named_parameters(recurse=False)}


def _learnable_affine_names(model: nn.Module) -> set[str]:
    return {f"{mod_name}.{p_name}" for mod_name, mod in model.named_modules()
            if type(mod).__name__ == "LearnableAffineBlock" for p_name, _ in mod.named_parameters(recurse=False)}


def stage_layout(model: nn.Module, family: str) -> list[str]:
    """Human-readable: which top-level modules each of the 5 stages holds (for tables and artifacts)."""
    stages = param_stages(model, family)
    layout = []
    for s in range(NUM_STAGES):
        prefixes = []
        for name, stage in stages.items():
            if stage == s:
                parts = name.split(".")
                depth = {"blocks": 3, "stages": 2}.get(parts[0], 1)
                prefix = ".".join(parts[:depth])
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
    """Optimizer parameter groups with the family's Paddle semantics (see the module docstring).

    A zero multiplier sets requires_grad False on that stage; frozen parameters are left out of the groups.
    """
    mults = parse_multipliers(multipliers, family)
    stages = param_stages(model, family)
    norms = norm_param_names(model)
    slow = _learnable_affine_names(model) if family == "hgnetv2" else set()
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        stage = stages[name]
        mult = head_mult if stage is HEAD else mults[stage]
        if mult == 0:  # a frozen stage freezes everything in it, norms included
            p.requires_grad_(False)
            continue
        decay = weight_decay
        if family in NO_NORM_DECAY and name in norms:
            decay = 0.0
        elif family == "generic" and (name in norms or p.ndim <= 1):
            decay = 0.0
        if name in slow:
            mult = mult * LAB_LR
        p.requires_grad_(True)
        label = "head" if stage is HEAD else f"stage{stage}"
        key = (label, mult, decay)
        if key not in groups:
            groups[key] = dict(params=[], names=[], lr=lr * mult, lr_mult=mult, weight_decay=decay,
                               name=f"{label}{'_no_decay' if decay == 0 and weight_decay else ''}")
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())
