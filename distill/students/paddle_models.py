"""PaddleClas-compatible architectures registered as timm models, so converted weights load unchanged.

Each is built from timm's own classes and block strings; a variant exists only where PaddleClas differs
from the nearest timm model (timm's hgnetv2_b0..b6 and resnext101_32x16d match as they are):
- ResNet18_vd/34_vd: the first block of stage 1 has a 1x1 projection shortcut (64 -> 64) timm omits.
- ResNet200_vd: PaddleClas stacks [3, 12, 48, 3] Bottlenecks; timm's resnet200d is [3, 24, 36, 3].
- Res2Net_vd: only stride-2 blocks skip the hierarchical sum and pool the last split, with an average
  pool that excludes padding; timm's Bottle2neck also does so in stage 1's first block and counts padding.
- MobileNetV1/V2: ReLU (timm: ReLU6) for V1; V2's first block keeps its 1x1 expansion conv.
- MobileNetV3: every block has a 1x1 expansion conv, middle widths are rounded from PaddleClas's absolute
  counts, SE reduces to channels // 4 with gate clip(0.2x + 0.5, 0, 1), the 1280 head conv has no bias
  (small uses 1280 too, where timm uses 1024).
- PP-LCNet: the 1280 head conv has no bias; widths x0.25 .. x2.5.
- PP-HGNetV2-B0..B3: the stem's 2x2 max pool pads with -inf (Paddle "SAME"); timm pads with zeros, which
  differs where the learnable affine after ReLU turns the border negative. Same state dict as timm's
  hgnetv2_b0..b3, so a converted file loads into either. B4..B6 (no affine) are timm's own.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import make_divisible
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet, _create_effnet
from timm.models.hgnet import HighPerfGpuNet, StemV2, model_cfgs as hgnet_cfgs
from timm.models.mobilenetv3 import MobileNetV3, _create_mnv3
from timm.models.res2net import Bottle2neck
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["PaddleHardSigmoid", "MV3_WIDTHS", "LCNET_WIDTHS", "RES2NET_DEPTHS", "HGNETV2_PADDLE", "paddle_width"]

MV3_WIDTHS = {"035": 0.35, "050": 0.5, "075": 0.75, "100": 1.0, "125": 1.25}
LCNET_WIDTHS = {"025": 0.25, "035": 0.35, "050": 0.5, "075": 0.75, "100": 1.0, "150": 1.5, "200": 2.0, "250": 2.5}
RES2NET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 200: (3, 12, 48, 3)}
HGNETV2_PADDLE = ("b0", "b1", "b2", "b3")  # the variants with a learnable affine in the stem

# PaddleClas MobileNetV3 NET_CONFIG rows: kernel, expansion channels, out channels, SE, ReLU (else
# hardswish), stride; `stages` nests them the way timm's mobilenetv3 groups blocks by resolution.
_MV3 = {
    "large": dict(rows=[(3, 16, 16, 0, 1, 1), (3, 64, 24, 0, 1, 2), (3, 72, 24, 0, 1, 1), (5, 72, 40, 1, 1, 2),
                        (5, 120, 40, 1, 1, 1), (5, 120, 40, 1, 1, 1), (3, 240, 80, 0, 0, 2), (3, 200, 80, 0, 0, 1),
                        (3, 184, 80, 0, 0, 1), (3, 184, 80, 0, 0, 1), (3, 480, 112, 1, 0, 1), (3, 672, 112, 1, 0, 1),
                        (5, 672, 160, 1, 0, 2), (5, 960, 160, 1, 0, 1), (5, 960, 160, 1, 0, 1)],
                  stages=(1, 2, 3, 4, 2, 3), last=960),
    "small": dict(rows=[(3, 16, 16, 1, 1, 2), (3, 72, 24, 0, 1, 2), (3, 88, 24, 0, 1, 1), (5, 96, 40, 1, 0, 2),
                        (5, 240, 40, 1, 0, 1), (5, 240, 40, 1, 0, 1), (5, 120, 48, 1, 0, 1), (5, 144, 48, 1, 0, 1),
                        (5, 288, 96, 1, 0, 2), (5, 576, 96, 1, 0, 1), (5, 576, 96, 1, 0, 1)],
                  stages=(1, 2, 3, 2, 3), last=576),
}
# PP-LCNet NET_CONFIG (blocks2..blocks6): kernel, out channels, stride, SE; nested as timm's lcnet.
_LCNET_STAGES = [[(3, 32, 1, 0)], [(3, 64, 2, 0), (3, 64, 1, 0)], [(3, 128, 2, 0), (3, 128, 1, 0)],
                 [(3, 256, 2, 0), (5, 256, 1, 0)], [(5, 256, 1, 0)] * 4, [(5, 512, 2, 1), (5, 512, 1, 1)]]


def paddle_width(scale: float) -> str:
    """PaddleClas's width suffix in model names: 0.35 -> x0_35, 1.0 -> x1_0, 2.5 -> x2_5."""
    text = f"{scale:g}"
    return "x" + (text if "." in text else text + ".0").replace(".", "_")


class PaddleHardSigmoid(nn.Module):
    """Paddle's hardsigmoid as PaddleClas's MobileNetV3 SE uses it: clip(0.2 x + 0.5, 0, 1)."""

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.2 * x + 0.5).clamp_(0.0, 1.0)


class ResNetVdProjection(ResNet):
    """timm ResNet-D whose stage-1 first block gets PaddleClas's 1x1 conv + BN shortcut (ResNet18/34_vd)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        block = self.layer1[0]
        if block.downsample is None:
            cin, cout = block.conv1.in_channels, block.bn2.num_features
            norm = kwargs.get("norm_layer") or nn.BatchNorm2d
            block.downsample = nn.Sequential(nn.Identity(), nn.Conv2d(cin, cout, 1, bias=False), norm(cout))


class PaddleBottle2neck(Bottle2neck):
    """Res2Net_vd block as PaddleClas runs it: stride-2 blocks alone skip the hierarchical sum and
    average-pool the last split, excluding padding (Paddle's AvgPool2D default)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, **kwargs):
        super().__init__(inplanes, planes, stride=stride, downsample=downsample, **kwargs)
        self.is_first = stride > 1
        self.pool = nn.AvgPool2d(3, stride, padding=1, count_include_pad=False) if stride > 1 else None


class PaddleStemV2(StemV2):
    """PP-HGNetV2 stem with Paddle's "SAME" max pool: the padded row and column never win the max."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem1(x)
        x2 = self.stem2b(F.pad(self.stem2a(F.pad(x, (0, 1, 0, 1))), (0, 1, 0, 1)))
        x1 = self.pool(F.pad(x, (0, 1, 0, 1), value=float("-inf")))
        return self.stem4(self.stem3(torch.cat([x1, x2], dim=1)))


class PaddleHGNetV2(HighPerfGpuNet):
    """timm's HighPerfGpuNet with PaddleStemV2 (same parameters, so the state dicts are interchangeable)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(self.stem) is StemV2:
            self.stem.__class__ = PaddleStemV2


def _cfg(**kwargs) -> dict:
    # PaddleClas eval preprocessing: resize 256, center crop 224, ImageNet mean/std, bilinear.
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "license": "apache-2.0", "origin_url": "https://github.com/PaddlePaddle/PaddleClas", **kwargs}


_RESNET_CFG = dict(first_conv="conv1.0", classifier="fc")
_MOBILE_CFG = dict(first_conv="conv_stem", classifier="classifier", pool_size=(1, 1))
default_cfgs = generate_default_cfgs({
    "resnet18d_paddle.paddleclas": _cfg(**_RESNET_CFG),
    "resnet34d_paddle.paddleclas": _cfg(**_RESNET_CFG),
    "resnet200d_paddle.paddleclas": _cfg(**_RESNET_CFG),
    **{f"res2net{d}_vd_26w_4s_paddle.paddleclas": _cfg(**_RESNET_CFG) for d in RES2NET_DEPTHS},
    "mobilenetv1_100_paddle.paddleclas": _cfg(**_MOBILE_CFG),
    "mobilenetv2_100_paddle.paddleclas": _cfg(**_MOBILE_CFG),
    **{f"mobilenetv3_{size}_{w}_paddle.paddleclas": _cfg(**_MOBILE_CFG) for size in _MV3 for w in MV3_WIDTHS},
    **{f"lcnet_{w}_paddle.paddleclas": _cfg(**_MOBILE_CFG) for w in LCNET_WIDTHS},
    **{f"hgnetv2_{b}_paddle.paddleclas": _cfg(first_conv="stem.stem1.conv", classifier="head.fc")
       for b in HGNETV2_PADDLE},
})


def _resnet(variant: str, pretrained: bool, cls=ResNet, **kwargs) -> ResNet:
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


def _mv3_arch(size: str, scale: float) -> list:
    """Block strings whose expansion ratio reproduces PaddleClas's middle width _make_divisible(scale * exp)
    exactly (timm rounds in_chs * ratio, PaddleClas rounds the absolute count)."""
    spec = _MV3[size]
    strings, in_c = [], make_divisible(16 * scale)
    for k, exp, c, se, relu, s in spec["rows"]:
        ratio = make_divisible(scale * exp) / in_c
        strings.append(f"ir_r1_k{k}_s{s}_e{ratio!r}_c{c}" + ("_se0.25" if se else "") + ("_nre" if relu else ""))
        in_c = make_divisible(scale * c)
    arch, start = [], 0
    for n in spec["stages"]:
        arch.append(strings[start:start + n])
        start += n
    return arch + [[f"cn_r1_k1_s1_c{spec['last']}"]]


def _paddle_mobilenetv3(variant: str, size: str, scale: float, pretrained: bool = False, **kwargs) -> MobileNetV3:
    se_layer = partial(SqueezeExcite, gate_layer=PaddleHardSigmoid, force_act_layer=nn.ReLU,
                       rd_round_fn=int)  # PaddleClas SEModule: channel // 4
    model_kwargs = dict(block_args=decode_arch_def(_mv3_arch(size, scale)), num_features=1280, head_bias=False,
                        stem_size=16, round_chs_fn=partial(round_channels, multiplier=scale),
                        act_layer=nn.Hardswish, se_layer=se_layer)
    return _create_mnv3(variant, pretrained, **dict(model_kwargs, **kwargs))


def _paddle_lcnet(variant: str, scale: float, pretrained: bool = False, **kwargs) -> MobileNetV3:
    arch = [[f"dsa_r1_k{k}_s{s}_c{c}" + ("_se0.25" if se else "") for k, c, s, se in stage] for stage in _LCNET_STAGES]
    model_kwargs = dict(block_args=decode_arch_def(arch), num_features=1280, head_bias=False, stem_size=16,
                        round_chs_fn=partial(round_channels, multiplier=scale), act_layer=nn.Hardswish,
                        se_layer=partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU))
    return _create_mnv3(variant, pretrained, **dict(model_kwargs, **kwargs))


@register_model
def resnet18d_paddle(pretrained: bool = False, **kwargs) -> ResNet:
    """PaddleClas ResNet18_vd: resnet18d plus a 1x1 projection shortcut in stage 1's first block."""
    args = dict(block=BasicBlock, layers=(2, 2, 2, 2), stem_width=32, stem_type="deep", avg_down=True)
    return _resnet("resnet18d_paddle", pretrained, ResNetVdProjection, **dict(args, **kwargs))


@register_model
def resnet34d_paddle(pretrained: bool = False, **kwargs) -> ResNet:
    """PaddleClas ResNet34_vd: resnet34d plus a 1x1 projection shortcut in stage 1's first block."""
    args = dict(block=BasicBlock, layers=(3, 4, 6, 3), stem_width=32, stem_type="deep", avg_down=True)
    return _resnet("resnet34d_paddle", pretrained, ResNetVdProjection, **dict(args, **kwargs))


@register_model
def resnet200d_paddle(pretrained: bool = False, **kwargs) -> ResNet:
    """PaddleClas ResNet200_vd: layers [3, 12, 48, 3] (timm resnet200d has [3, 24, 36, 3])."""
    args = dict(block=Bottleneck, layers=(3, 12, 48, 3), stem_width=32, stem_type="deep", avg_down=True)
    return _resnet("resnet200d_paddle", pretrained, **dict(args, **kwargs))


def _register_res2net(depth: int) -> None:
    name = f"res2net{depth}_vd_26w_4s_paddle"

    def create(pretrained: bool = False, **kwargs) -> ResNet:
        args = dict(block=PaddleBottle2neck, layers=RES2NET_DEPTHS[depth], base_width=26, stem_type="deep",
                    avg_down=True, stem_width=32, block_args=dict(scale=4))
        return _resnet(name, pretrained, **dict(args, **kwargs))

    create.__name__ = name
    create.__doc__ = f"PaddleClas Res2Net{depth}_vd_26w_4s (see PaddleBottle2neck)."
    register_model(create)


@register_model
def mobilenetv1_100_paddle(pretrained: bool = False, **kwargs) -> EfficientNet:
    """PaddleClas MobileNetV1: timm mobilenetv1_100 with ReLU instead of ReLU6."""
    arch = [["dsa_r1_k3_s1_c64"], ["dsa_r2_k3_s2_c128"], ["dsa_r2_k3_s2_c256"], ["dsa_r6_k3_s2_c512"],
            ["dsa_r2_k3_s2_c1024"]]
    args = dict(block_args=decode_arch_def(arch), num_features=0, stem_size=32, act_layer=nn.ReLU)
    return _create_effnet("mobilenetv1_100_paddle", pretrained, **dict(args, **kwargs))


@register_model
def mobilenetv2_100_paddle(pretrained: bool = False, **kwargs) -> EfficientNet:
    """PaddleClas MobileNetV2: timm mobilenetv2_100 whose first block keeps a 1x1 expansion (32 -> 32)."""
    arch = [["ir_r1_k3_s1_e1_c16"], ["ir_r2_k3_s2_e6_c24"], ["ir_r3_k3_s2_e6_c32"], ["ir_r4_k3_s2_e6_c64"],
            ["ir_r3_k3_s1_e6_c96"], ["ir_r3_k3_s2_e6_c160"], ["ir_r1_k3_s1_e6_c320"]]
    args = dict(block_args=decode_arch_def(arch), num_features=1280, stem_size=32, act_layer=nn.ReLU6)
    return _create_effnet("mobilenetv2_100_paddle", pretrained, **dict(args, **kwargs))


def _register_mobile(name: str, builder, doc: str) -> None:
    def create(pretrained: bool = False, **kwargs):
        return builder(name, pretrained=pretrained, **kwargs)

    create.__name__, create.__doc__ = name, doc
    register_model(create)


for _depth in RES2NET_DEPTHS:
    _register_res2net(_depth)
for _size in _MV3:
    for _w, _scale in MV3_WIDTHS.items():
        _register_mobile(f"mobilenetv3_{_size}_{_w}_paddle", partial(_paddle_mobilenetv3, size=_size, scale=_scale),
                         f"PaddleClas MobileNetV3_{_size}_x{_scale:g} (see the module docstring).")
def _register_hgnetv2(b: str) -> None:
    name = f"hgnetv2_{b}_paddle"

    def create(pretrained: bool = False, **kwargs) -> HighPerfGpuNet:
        out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
        return build_model_with_cfg(PaddleHGNetV2, name, pretrained, model_cfg=hgnet_cfgs[f"hgnetv2_{b}"],
                                    feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
                                    **dict(dict(use_lab=True), **kwargs))

    create.__name__ = name
    create.__doc__ = f"PaddleClas PPHGNetV2_{b.upper()}: timm's hgnetv2_{b} with Paddle's stem max pool."
    register_model(create)


for _b in HGNETV2_PADDLE:
    _register_hgnetv2(_b)
for _w, _scale in LCNET_WIDTHS.items():
    _register_mobile(f"lcnet_{_w}_paddle", partial(_paddle_lcnet, scale=_scale),
                     f"PaddleClas PPLCNet_x{_scale:g}: timm's lcnet with a bias-free head conv.")
