"""Student backbone + FPN: any student artifact or timm model, features at strides 4-32, P2-P6 out.

The trunk is the student's own timm model wrapped by timm's feature getter (`features_only` with
`feature_cls='getter'`), so parameter names stay the classification model's and the per-stage
multiplier rules of distill.students.stages apply unchanged. FPN and P6 (max-pool of P5) follow detectron2.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn
from timm.layers import freeze_batch_norm_2d  # torchvision FrozenBatchNorm2d; timm FrozenBatchNormAct2d for BN+act
from timm.models._features import FeatureGetterNet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from distill.core.errors import UserError
from distill.students.decay import matched_weight_decay
from distill.students.stages import stage_param_groups

STRIDES = (4, 8, 16, 32)
LEVELS = ("p2", "p3", "p4", "p5")  # pooled by the RoI heads; "pool" (P6) feeds only the RPN
DEFAULT_WEIGHT_DECAY = 1e-4         # detectron2, when the artifact does not record its own


def has_trained_weights(meta: dict) -> bool:
    """False only for a timm model at random init (`timm:ARCH` without pretrained)."""
    return (meta.get("pretrain") or {}).get("source") != "random init"


def default_multipliers(meta: dict) -> list[float]:
    """The artifact's recommended detection list (r50_vd 0.05..0.15, mv3 0.25..0.75); plain models 1.0."""
    return list((meta.get("recommended") or {}).get("detection") or [1.0] * 5)


def matched_decay(meta: dict) -> tuple[float, str]:
    """(weight decay, where it came from) for SGD: the student's own coupled L2, else 1e-4; refuses AdamW's."""
    return matched_weight_decay(meta, DEFAULT_WEIGHT_DECAY, flag="-o optim.weight_decay=VALUE")


def default_weight_decay(meta: dict) -> float:
    """Matched L2 decay: the value the student was pretrained with, when it is an SGD-style (coupled) L2."""
    return matched_decay(meta)[0]


def feature_indices(model: nn.Module) -> list[int]:
    """timm feature_info indices of the last feature at each stride 4, 8, 16, 32."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UserError(f"{type(model).__name__} has no timm feature_info: it cannot serve as a detection backbone")
    last = {f["reduction"]: i for i, f in enumerate(info)}
    missing = [s for s in STRIDES if s not in last]
    if missing:
        raise UserError(f"{type(model).__name__} has no features at stride {missing} (it has "
                        f"{sorted(last)}); detection needs strides 4, 8, 16 and 32")
    return [last[s] for s in STRIDES]


class BackboneFPN(nn.Module):
    """Trunk features C2-C5 -> FPN P2-P5 plus P6 ("pool"), all with `out_channels` channels.

    `param_rules` maps each trunk parameter name (relative to `body.model`) to (lr_mult, decay factor,
    group label), computed by distill.students.stages on the intact classification model: timm's group_matcher
    rule for generic models counts the classifier, which the feature wrapper prunes.
    """

    def __init__(self, trunk: nn.Module, family: str, multipliers, out_channels: int = 256,
                 frozen_bn: bool = True):
        super().__init__()
        indices = feature_indices(trunk)
        groups = stage_param_groups(trunk, multipliers, lr=1.0, weight_decay=1.0, family=family)
        self.param_rules = {n: (g["lr_mult"], g["weight_decay"], g["name"]) for g in groups for n in g["names"]}
        self.body = FeatureGetterNet(trunk, out_indices=indices)  # prunes the head
        if frozen_bn:  # detectron2 FrozenBN: statistics and affine fixed at the pretrained values
            self.body = freeze_batch_norm_2d(self.body)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.frozen_bn = frozen_bn
        self.multipliers = list(multipliers)

    def forward(self, x):
        return self.fpn(OrderedDict(zip(LEVELS, self.body(x))))


def build_backbone(trunk: nn.Module, meta: dict, *, multipliers=None, frozen_bn=None,
                   out_channels: int = 256) -> BackboneFPN:
    """`trunk` is the student's timm classification model with its weights loaded (see load_student)."""
    if frozen_bn is None:
        frozen_bn = has_trained_weights(meta)
    multipliers = default_multipliers(meta) if multipliers is None else multipliers
    family = (meta.get("stages") or {}).get("family", "generic")
    return BackboneFPN(trunk, family, multipliers, out_channels=out_channels, frozen_bn=frozen_bn)
