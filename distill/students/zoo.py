"""The student model zoo: our names -> timm architectures, as data (one row per model).

`python -m distill.zoo` prints the table. `timm:ANY_NAME` gives any timm model with the generic stage rule.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn

from distill.students import paddle_models  # registers the PaddleClas-compatible timm architectures
from distill.students.paddle_models import paddle_width
from distill.core.errors import UserError

# Default per-stage multipliers (PaddleClas): distilled students only; plain models use 1.0.
RESNET_TRANSFER = (0.1, 0.1, 0.2, 0.2, 0.3)
RESNET_DETECTION = (0.05, 0.05, 0.1, 0.1, 0.15)
MOBILE = (0.25, 0.25, 0.5, 0.5, 0.75)
PLAIN = (1.0, 1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch: str                      # timm model name
    family: str                    # stage rule in distill.students.stages (its LAYOUT_HELP keys)
    transfer_mult: tuple = PLAIN
    detection_mult: tuple = PLAIN
    paddle_name: str | None = None  # PaddleClas model name, where one exists
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs


def _resnet_like(name, arch, paddle_name):
    return ZooEntry(name, arch, "resnet", RESNET_TRANSFER, RESNET_DETECTION, paddle_name)


# One row per model. Archs ending in _paddle are the PaddleClas-compatible variants of paddle_models.py;
# the rest are timm's own. HGNetV2's multipliers follow the ResNet_vd lists by analogy (a server-class
# distilled student); no PaddleClas table gives them.
ZOO = {e.name: e for e in [
    _resnet_like("r18_vd", "resnet18d_paddle", "ResNet18_vd"),
    _resnet_like("r34_vd", "resnet34d_paddle", "ResNet34_vd"),
    _resnet_like("r50_vd", "resnet50d", "ResNet50_vd"),
    _resnet_like("r101_vd", "resnet101d", "ResNet101_vd"),
    _resnet_like("r152_vd", "resnet152d", "ResNet152_vd"),
    _resnet_like("r200_vd", "resnet200d_paddle", "ResNet200_vd"),  # [3, 12, 48, 3], unlike timm's resnet200d
    *(_resnet_like(f"res2net{d}_vd_26w_4s", f"res2net{d}_vd_26w_4s_paddle", f"Res2Net{d}_vd_26w_4s")
      for d in paddle_models.RES2NET_DEPTHS),
    ZooEntry("mv1", "mobilenetv1_100_paddle", "generic", MOBILE, MOBILE, "MobileNetV1"),
    ZooEntry("mv2", "mobilenetv2_100_paddle", "generic", MOBILE, MOBILE, "MobileNetV2"),
    *(ZooEntry(f"mv3_{size}" if scale == 1.0 else f"mv3_{size}_{paddle_width(scale)}",
               f"mobilenetv3_{size}_{tag}_paddle", "mobilenetv3", MOBILE, MOBILE,
               f"MobileNetV3_{size}_{paddle_width(scale)}")
      for size in ("large", "small") for tag, scale in paddle_models.MV3_WIDTHS.items()),
    *(ZooEntry(f"pplcnet_{paddle_width(scale)}", f"lcnet_{tag}_paddle", "lcnet", MOBILE, MOBILE,
               f"PPLCNet_{paddle_width(scale)}") for tag, scale in paddle_models.LCNET_WIDTHS.items()),
    *(ZooEntry(f"hgnetv2_b{i}", f"hgnetv2_b{i}_paddle" if f"b{i}" in paddle_models.HGNETV2_PADDLE else f"hgnetv2_b{i}",
               "hgnetv2", RESNET_TRANSFER, RESNET_DETECTION, f"PPHGNetV2_B{i}") for i in range(7)),
    ZooEntry("resnext101_32x16d_wsl", "resnext101_32x16d", "resnet", PLAIN, PLAIN, "ResNeXt101_32x16d_wsl"),
]}

TIMM_PREFIX = "timm:"   # `timm:ARCH`: any timm model, outside the zoo


def is_zoo_name(name: str) -> bool:
    """A name this module builds: a zoo row or `timm:ARCH` (as opposed to an artifact path or bare arch)."""
    return name in ZOO or name.startswith(TIMM_PREFIX)


# timm architectures whose stage rule is known, for `timm:` names and artifacts that name an arch.
ARCH_FAMILY = {e.arch: e.family for e in ZOO.values()}
_PREFIX_FAMILY = (("mobilenetv3_", "mobilenetv3"), ("lcnet_", "lcnet"), ("hgnetv2_", "hgnetv2"),
                  ("res2net", "resnet"))


def family_of_arch(arch: str) -> str:
    if arch in ARCH_FAMILY:
        return ARCH_FAMILY[arch]
    return next((family for prefix, family in _PREFIX_FAMILY if arch.startswith(prefix)), "generic")


def get_entry(name: str) -> ZooEntry:
    """A zoo name, or `timm:ARCH` for any timm model (plain multipliers, family from the arch)."""
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        if not timm.is_model(arch):
            near = difflib.get_close_matches(arch, timm.list_models(), n=3)
            raise UserError(f"unknown timm model {arch!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))
        return ZooEntry(name, arch, family_of_arch(arch))
    if name not in ZOO:
        near = difflib.get_close_matches(name, list(ZOO), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"unknown zoo name {name!r}; {hint}known: {', '.join(ZOO)}, or timm:ANY_TIMM_NAME")
    return ZOO[name]


def create_model(name: str, num_classes: int = 1000, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build a zoo model (or a `timm:` / bare timm arch name) with `num_classes` outputs."""
    if is_zoo_name(name):
        entry = get_entry(name)
        arch, kwargs = entry.arch, {**entry.kwargs, **kwargs}
    elif timm.is_model(name):
        arch = name
    else:
        get_entry(name)  # raises the helpful error
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)


def zoo_table() -> list[dict]:
    from distill.students.stages import stage_layout  # stages imports zoo: keep the import local

    rows = []
    for e in ZOO.values():
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = timm.create_model(e.arch, num_classes=1000)
        params = sum(p.numel() for p in model.parameters())
        rows.append(dict(name=e.name, arch=e.arch, params=f"{params / 1e6:.2f}M",
                         stages=" | ".join(stage_layout(model, e.family)),
                         transfer=",".join(f"{m:g}" for m in e.transfer_mult),
                         detection=",".join(f"{m:g}" for m in e.detection_mult)))
    return rows
