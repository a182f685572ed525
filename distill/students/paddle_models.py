"""PaddleClas-compatible architectures registered as timm models, so converted weights load unchanged.

MobileNetV3 (PaddleClas legendary_models/mobilenet_v3.py) differs from timm's mobilenetv3_*_100
(DESIGN.md): every block has a 1x1 expansion conv (large's first block is `ir_..._e1` here, not `ds`),
SE reduces to channels // 4 with gate clip(0.2x + 0.5, 0, 1), and the 1280 head conv has no bias
(small also uses 1280, where timm uses 1024). Built from timm's own MobileNetV3 class and arch strings.

ResNet200_vd is PaddleClas's [3, 12, 48, 3] Bottleneck stack; timm's resnet200d is [3, 24, 36, 3].
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.mobilenetv3 import MobileNetV3, _create_mnv3
from timm.models.resnet import Bottleneck, ResNet, _create_resnet

__all__ = ["PaddleHardSigmoid"]

# PaddleClas NET_CONFIG rows (k, exp, c, se, act, s) written as timm block strings, grouped in timm stages.
_LARGE_ARCH = [
    ["ir_r1_k3_s1_e1_c16_nre"],
    ["ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"],
    ["ir_r3_k5_s2_e3_c40_se0.25_nre"],
    ["ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"],
    ["ir_r2_k3_s1_e6_c112_se0.25"],
    ["ir_r3_k5_s2_e6_c160_se0.25"],
    ["cn_r1_k1_s1_c960"],
]
_SMALL_ARCH = [
    ["ir_r1_k3_s2_e1_c16_se0.25_nre"],
    ["ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"],
    ["ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"],
    ["ir_r2_k5_s1_e3_c48_se0.25"],
    ["ir_r3_k5_s2_e6_c96_se0.25"],
    ["cn_r1_k1_s1_c576"],
]


class PaddleHardSigmoid(nn.Module):
    """Paddle's hardsigmoid as PaddleClas's SE uses it: clip(0.2 x + 0.5, 0, 1) (timm's is relu6(x+3)/6)."""

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.2 * x + 0.5).clamp_(0.0, 1.0)


def _cfg(**kwargs) -> dict:
    # PaddleClas eval preprocessing: resize 256, center crop 224, ImageNet mean/std, bilinear.
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "license": "apache-2.0", "origin_url": "https://github.com/PaddlePaddle/PaddleClas", **kwargs}


default_cfgs = generate_default_cfgs({
    "mobilenetv3_large_100_paddle.paddleclas": _cfg(first_conv="conv_stem", classifier="classifier", pool_size=(1, 1)),
    "mobilenetv3_small_100_paddle.paddleclas": _cfg(first_conv="conv_stem", classifier="classifier", pool_size=(1, 1)),
    "resnet200d_paddle.paddleclas": _cfg(first_conv="conv1.0", classifier="fc"),
})


def _paddle_mobilenetv3(variant: str, arch_def: list, pretrained: bool = False, **kwargs) -> MobileNetV3:
    se_layer = partial(SqueezeExcite, gate_layer=PaddleHardSigmoid, force_act_layer=nn.ReLU,
                       rd_round_fn=int)  # PaddleClas SEModule: channel // 4
    model_kwargs = dict(
        block_args=decode_arch_def(arch_def),
        num_features=1280,
        head_bias=False,
        stem_size=16,
        act_layer=nn.Hardswish,
        se_layer=se_layer,
        **kwargs,
    )
    return _create_mnv3(variant, pretrained, **model_kwargs)


@register_model
def mobilenetv3_large_100_paddle(pretrained: bool = False, **kwargs) -> MobileNetV3:
    """PaddleClas MobileNetV3_large_x1_0 (5,504,638 values incl. BN stats)."""
    return _paddle_mobilenetv3("mobilenetv3_large_100_paddle", _LARGE_ARCH, pretrained, **kwargs)


@register_model
def mobilenetv3_small_100_paddle(pretrained: bool = False, **kwargs) -> MobileNetV3:
    """PaddleClas MobileNetV3_small_x1_0."""
    return _paddle_mobilenetv3("mobilenetv3_small_100_paddle", _SMALL_ARCH, pretrained, **kwargs)


@register_model
def resnet200d_paddle(pretrained: bool = False, **kwargs) -> ResNet:
    """PaddleClas ResNet200_vd: layers [3, 12, 48, 3] (timm resnet200d has [3, 24, 36, 3])."""
    model_args = dict(block=Bottleneck, layers=(3, 12, 48, 3), stem_width=32, stem_type="deep", avg_down=True)
    return _create_resnet("resnet200d_paddle", pretrained, **dict(model_args, **kwargs))
