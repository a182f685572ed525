"""The optimizer a detectron2 config cannot express: the student's per-stage lr multipliers with its family's
Paddle semantics and its matched weight decay on the backbone, detectron2's defaults for the rest.

detectron2's `get_default_optimizer_params` has no per-stage decay, so the trunk's groups come from the same
rules as the kit's detector (`detection.backbone.student_body`, `detection.model.param_groups`): lr =
SOLVER.BASE_LR x the stage's multiplier, decay = MODEL.SSLD.WEIGHT_DECAY (None: matched to the student's
pretraining L2) x the family's norm rule. Everything else (FPN, RPN, box heads) is grouped by detectron2
itself with SOLVER.WEIGHT_DECAY, WEIGHT_DECAY_NORM, BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS, as its
`build_optimizer` does; detectron2's LRMultiplier scales every group by one factor, so the ratios hold.
"""
from __future__ import annotations

import logging

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from distill.students.decay import weight_decay_for

from ..backbone import DEFAULT_WEIGHT_DECAY
from .backbone import SSLDBackbone

logger = logging.getLogger("detectron2.ssld")


def ssld_param_groups(cfg: CfgNode, model: torch.nn.Module) -> tuple[list[dict], list[str]]:
    """(optimizer parameter groups, one line per source of their values)."""
    base_lr = cfg.SOLVER.BASE_LR
    groups, notes, trunk_params = [], [], set()
    for module_name, backbone in model.named_modules():
        if not isinstance(backbone, SSLDBackbone):
            continue
        decay, why = weight_decay_for(cfg.MODEL.SSLD.WEIGHT_DECAY, backbone.meta, DEFAULT_WEIGHT_DECAY,
                                      flag="MODEL.SSLD.WEIGHT_DECAY", given_by="MODEL.SSLD.WEIGHT_DECAY")
        by_rule: dict[tuple, dict] = {}
        for name, p in backbone.body.model.named_parameters():
            trunk_params.add(p)
            if not p.requires_grad:          # a stage at multiplier 0, or FrozenBN
                continue
            mult, factor, label = backbone.param_rules[name]
            if (mult, factor, label) not in by_rule:
                by_rule[(mult, factor, label)] = dict(params=[], lr=base_lr * mult, weight_decay=decay * factor,
                                                      name=f"{module_name}:{label}", lr_mult=mult)
            by_rule[(mult, factor, label)]["params"].append(p)
        groups += by_rule.values()
        frozen = [f"stage{i}" for i, m in enumerate(backbone.multipliers) if m == 0]
        notes.append(f"{module_name} ({backbone.meta.get('name') or backbone.meta['arch']}, {backbone.family} "
                     f"stages, {'FrozenBN' if backbone.frozen_bn else 'trainable BN'}): multipliers "
                     f"{backbone.multipliers} ({backbone.multipliers_source})"
                     + (f", {', '.join(frozen)} frozen" if frozen else "") + f"; weight decay {why}")
    rest = get_default_optimizer_params(model, base_lr=base_lr, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                                        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
    for group in rest:
        group["params"] = [p for p in group["params"] if p not in trunk_params]
    groups += [g for g in rest if g["params"]]
    bias = cfg.SOLVER.WEIGHT_DECAY_BIAS
    notes.append(f"the rest (FPN, RPN, box heads): lr x1 (biases x{cfg.SOLVER.BIAS_LR_FACTOR:g}, "
                 f"SOLVER.BIAS_LR_FACTOR), weight decay {cfg.SOLVER.WEIGHT_DECAY:g} (SOLVER.WEIGHT_DECAY), "
                 f"norms {cfg.SOLVER.WEIGHT_DECAY_NORM:g} (SOLVER.WEIGHT_DECAY_NORM), biases "
                 + (f"{bias:g} (SOLVER.WEIGHT_DECAY_BIAS)" if bias is not None else "as the weights"))
    if not any(isinstance(m, SSLDBackbone) for m in model.modules()):
        notes.insert(0, "no SSLD backbone in the model (MODEL.BACKBONE.NAME is not build_ssld_*): "
                        "detectron2's defaults for every parameter")
    return groups, notes


def build_ssld_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`sgd` over `ssld_param_groups`, logging where each value came from (the logger "detectron2.ssld")."""
    groups, notes = ssld_param_groups(cfg, model)
    for line in notes:
        logger.info("optimizer: %s", line)
    return sgd(cfg, groups)


def sgd(cfg: CfgNode, groups: list[dict]) -> torch.optim.Optimizer:
    """SGD as detectron2's build_optimizer makes it: momentum, nesterov and gradient clipping from SOLVER."""
    optimizer = torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                                nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY, foreach=True)
    return maybe_add_gradient_clipping(cfg, optimizer)
