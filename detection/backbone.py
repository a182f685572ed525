"""Student backbone + FPN: any student artifact or timm model, features at strides 4-32, P2-P6 out.

The trunk is the student's own timm model wrapped by timm's feature getter (`features_only` with
`feature_cls='getter'`), so parameter names stay the classification model's and the per-stage
multiplier rules of distill.students.stages apply unchanged. FPN and P6 (max-pool of P5) follow detectron2.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d  # torchvision FrozenBatchNorm2d; timm FrozenBatchNormAct2d for BN+act
from timm.layers.norm_act import FrozenBatchNormAct2d
from timm.models._features import FeatureGetterNet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from distill.core.errors import UserError
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


# ---------------------------------------------------------------------------------------------------
# FrozenBN folded into the convolution before it. A frozen BN is a fixed per-channel affine map, so
# conv(x, W) * s + b == conv(x, W * s) + b: scaling the (small) weight replaces a multiply and an add over
# the (large) activation, forward and backward, in training and at inference. The modules change class
# only: parameter and buffer names, hence checkpoints and the lr-multiplier rules, stay the same.

class FoldedConv2d(nn.Conv2d):
    """A Conv2d that applies the frozen BN it feeds (`self.folded_bn[0]`, not a submodule) to its weight."""

    def forward(self, x):
        bn = self.folded_bn[0]
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        return self._conv_forward(x, self.weight * scale.view(-1, 1, 1, 1), shift)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """The BN whose affine map moved into the preceding FoldedConv2d: identity, buffers kept for the state dict."""

    def forward(self, x):
        return x


class FoldedFrozenBatchNormAct2d(FrozenBatchNormAct2d):
    """timm's BN + activation with the BN moved into the preceding conv: only dropout and activation remain."""

    def forward(self, x):
        return self.act(self.drop(x))


FOLDED = {FrozenBatchNorm2d: FoldedFrozenBatchNorm2d, FrozenBatchNormAct2d: FoldedFrozenBatchNormAct2d}


@torch.no_grad()
def fold_frozen_bn(model: nn.Module, probe_size: int = 64) -> int:
    """Fold every frozen BN whose input is exactly a plain Conv2d's output (found by tracing one small
    probe forward); returns how many. The probe output is compared before and after, so a BN whose
    conv output had another consumer can never be folded silently."""
    convs, pairs, keep, hooks = {}, [], [], []

    def conv_hook(module, _, out):
        keep.append(out)                        # ids stay unique while the probe runs
        convs[id(out)] = module

    def bn_hook(module, args):
        conv = convs.get(id(args[0]))
        if conv is not None and conv.out_channels == module.weight.numel():
            pairs.append((conv, module))

    for m in model.modules():
        if type(m) is nn.Conv2d:
            hooks.append(m.register_forward_hook(conv_hook))
        elif type(m) in FOLDED:
            hooks.append(m.register_forward_pre_hook(bn_hook))
    was_training = model.training
    model.eval()
    probe = torch.randn(1, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()).device)
    try:
        before = model(probe)
    finally:
        for h in hooks:
            h.remove()
    for conv, bn in pairs:
        conv.__class__, conv.folded_bn, bn.__class__ = FoldedConv2d, (bn,), FOLDED[type(bn)]
    after = model(probe)
    outs = lambda o: list(o.values()) if isinstance(o, dict) else list(o) if isinstance(o, (list, tuple)) else [o]
    if not all(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-6)
               for a, b in zip(outs(after), outs(before))):
        unfold_frozen_bn(model)
        pairs = []
    model.train(was_training)
    return len(pairs)


def unfold_frozen_bn(model: nn.Module) -> None:
    """Undo fold_frozen_bn (the reference path of the equivalence tests and benchmarks)."""
    back = {v: k for k, v in FOLDED.items()}
    for m in model.modules():
        if type(m) is FoldedConv2d:
            m.__class__ = nn.Conv2d
            del m.folded_bn
        elif type(m) in back:
            m.__class__ = back[type(m)]


def student_body(trunk: nn.Module, family: str, multipliers, frozen_bn: bool):
    """(features C2-C5, parameter rules, folded BN count): the trunk behind timm's feature getter, its
    FrozenBN folded in when `frozen_bn`. The rules map each trunk parameter name (relative to `body.model`)
    to (lr_mult, decay factor, group label), computed by distill.students.stages on the intact classification
    model: timm's group_matcher rule for generic models counts the classifier, which the feature getter prunes.
    A zero multiplier freezes its stage. Shared by this detector and detection.detectron2's backbone."""
    indices = feature_indices(trunk)
    groups = stage_param_groups(trunk, multipliers, lr=1.0, weight_decay=1.0, family=family)
    rules = {n: (g["lr_mult"], g["weight_decay"], g["name"]) for g in groups for n in g["names"]}
    body = FeatureGetterNet(trunk, out_indices=indices)  # prunes the head
    folded = 0
    if frozen_bn:  # detectron2 FrozenBN: statistics and affine fixed at the pretrained values
        body = freeze_batch_norm_2d(body)
        folded = fold_frozen_bn(body)
    return body, rules, folded


class BackboneFPN(nn.Module):
    """Trunk features C2-C5 -> FPN P2-P5 plus P6 ("pool"), all with `out_channels` channels; `param_rules`
    as `student_body` gives them."""

    def __init__(self, trunk: nn.Module, family: str, multipliers, out_channels: int = 256,
                 frozen_bn: bool = True, channels_last: bool = True):
        super().__init__()
        self.body, self.param_rules, folded = student_body(trunk, family, multipliers, frozen_bn)
        if frozen_bn:
            self.folded_bn = folded
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.frozen_bn = frozen_bn
        self.multipliers = list(multipliers)
        # channels_last: oneDNN (CPU) and cuDNN convolutions run on NHWC without reordering each layer,
        # and the CPU RoIAlign reads NHWC maps without a copy (detection.roi_align). The input is converted
        # here; build_detector converts the weights of the whole detector.
        self.channels_last = channels_last

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def forward(self, x):
        return self.fpn(OrderedDict(zip(LEVELS, self.body(x.contiguous(memory_format=self.memory_format)))))


def build_backbone(trunk: nn.Module, meta: dict, *, multipliers=None, frozen_bn=None,
                   out_channels: int = 256, channels_last: bool = True) -> BackboneFPN:
    """`trunk` is the student's timm classification model with its weights loaded (see load_student)."""
    if frozen_bn is None:
        frozen_bn = has_trained_weights(meta)
    multipliers = default_multipliers(meta) if multipliers is None else multipliers
    family = (meta.get("stages") or {}).get("family", "generic")
    return BackboneFPN(trunk, family, multipliers, out_channels=out_channels, frozen_bn=frozen_bn,
                       channels_last=channels_last)
