"""Convert PaddleClas weights (.pdparams) into a student artifact.

    python -m distill.convert ResNet50_vd_ssld_pretrained.pdparams --arch r50_vd -o r50_vd_ssld.safetensors

Names are PaddleClas's legendary_models state-dict keys (`blocks.3.conv1.bn._mean`). The mapping is
per module path and must be complete: every Paddle tensor lands in exactly one model tensor and every
model tensor is filled (BatchNorm's num_batches_tracked, which Paddle lacks, is set to 0).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn

from distill.students import paddle_models  # noqa: F401  registers the PaddleClas-compatible timm models
from distill.students.artifact import build_meta, preprocessing
from distill.core.errors import UserError
from distill.students.paddle_models import paddle_width
from distill.students.pdparams import load_pdparams

# Paddle's Dropout(p, mode="downscale_in_infer") (PaddleClas MobileNetV3, PP-LCNet) scales the classifier
# input by 1 - p at inference; timm's dropout is identity at inference, so the classifier absorbs it.
PADDLE_MV3_DROPOUT = 0.2

# Paddle parameter names -> torch names (Conv2D/Linear weight+bias, BatchNorm affine + running stats,
# PP-HGNetV2's learnable affine scale).
PARAM_NAMES = {"weight": "weight", "bias": "bias", "_mean": "running_mean", "_variance": "running_var",
               "scale": "scale"}


class ConversionError(UserError):
    pass


@dataclass(frozen=True)
class PaddleArch:
    name: str          # our zoo name
    paddle_name: str   # PaddleClas model name
    timm_arch: str     # timm model whose state dict the weights fill unchanged
    family: str        # module-path mapping, a key of MODULE_MAPS
    classifier: str = "fc"      # PaddleClas module name of the final Linear
    inference_dropout: float = 0.0  # p of a downscale_in_infer Dropout before it


def _mv3_archs():
    for size in ("large", "small"):
        for tag, scale in paddle_models.MV3_WIDTHS.items():
            width = paddle_width(scale)
            yield PaddleArch(f"mv3_{size}" if scale == 1.0 else f"mv3_{size}_{width}", f"MobileNetV3_{size}_{width}",
                             f"mobilenetv3_{size}_{tag}_paddle", "mobilenetv3", inference_dropout=PADDLE_MV3_DROPOUT)


def _lcnet_archs():
    for tag, scale in paddle_models.LCNET_WIDTHS.items():
        width = paddle_width(scale)
        yield PaddleArch(f"pplcnet_{width}", f"PPLCNet_{width}", f"lcnet_{tag}_paddle", "lcnet",
                         inference_dropout=PADDLE_MV3_DROPOUT)


PADDLE_ARCHS = {a.name: a for a in [
    PaddleArch("r18_vd", "ResNet18_vd", "resnet18d_paddle", "resnet_vd"),  # stage-1 projection: not resnet18d
    PaddleArch("r34_vd", "ResNet34_vd", "resnet34d_paddle", "resnet_vd"),
    PaddleArch("r50_vd", "ResNet50_vd", "resnet50d", "resnet_vd"),
    PaddleArch("r101_vd", "ResNet101_vd", "resnet101d", "resnet_vd"),
    PaddleArch("r152_vd", "ResNet152_vd", "resnet152d", "resnet_vd"),
    PaddleArch("r200_vd", "ResNet200_vd", "resnet200d_paddle", "resnet_vd"),  # depths differ from resnet200d
    *(PaddleArch(f"res2net{d}_vd_26w_4s", f"Res2Net{d}_vd_26w_4s", f"res2net{d}_vd_26w_4s_paddle", "res2net_vd",
                 classifier="out") for d in paddle_models.RES2NET_DEPTHS),
    PaddleArch("mv1", "MobileNetV1", "mobilenetv1_100_paddle", "mobilenetv1"),
    PaddleArch("mv2", "MobileNetV2", "mobilenetv2_100_paddle", "mobilenetv2", classifier="out"),
    *_mv3_archs(),
    *_lcnet_archs(),
    # B0..B3 differ from timm's hgnetv2_b* only in the stem pool's padding; their files load into either
    *(PaddleArch(f"hgnetv2_b{i}", f"PPHGNetV2_B{i}",
                 f"hgnetv2_b{i}_paddle" if f"b{i}" in paddle_models.HGNETV2_PADDLE else f"hgnetv2_b{i}", "hgnetv2")
      for i in range(7)),
    PaddleArch("resnext101_32x16d_wsl", "ResNeXt101_32x16d_wsl", "resnext101_32x16d", "resnext_wsl",
               classifier="_out"),
]}


def get_paddle_arch(name: str) -> PaddleArch:
    """Our zoo name (`r50_vd`) or the PaddleClas name (`ResNet50_vd`)."""
    for arch in PADDLE_ARCHS.values():
        if name in (arch.name, arch.paddle_name):
            return arch
    supported = ", ".join(f"{a.name} ({a.paddle_name})" for a in PADDLE_ARCHS.values())
    raise ConversionError(f"unknown --arch {name!r}; supported: {supported}")


def _conv_bn(src: str, dst_conv: str, dst_bn: str, conv: str = "conv", bn: str = "bn") -> dict[str, str]:
    return {f"{src}.{conv}": dst_conv, f"{src}.{bn}": dst_bn}


def _flat_blocks(model: nn.Module) -> list[str]:
    """timm EfficientNet/MobileNetV3 blocks in forward order (`blocks.S.J`)."""
    return [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]


def _resnet_vd_modules(model: nn.Module) -> dict[str, str]:
    """PaddleClas ResNet_vd (stem.i, blocks.n.conv0..2/short, fc) -> timm ResNet-D (conv1, layerS.B, fc)."""
    modules = {"stem.0.conv": "conv1.0", "stem.0.bn": "conv1.1", "stem.1.conv": "conv1.3",
               "stem.1.bn": "conv1.4", "stem.2.conv": "conv1.6", "stem.2.bn": "bn1", "fc": "fc"}
    n = 0
    for stage in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{stage}")):
            dst = f"layer{stage}.{b}"
            for i in range(3 if hasattr(block, "conv3") else 2):  # Paddle conv0.. = timm conv1/bn1 ..
                modules.update(_conv_bn(f"blocks.{n}.conv{i}", f"{dst}.conv{i + 1}", f"{dst}.bn{i + 1}"))
            # downsample.0 is the average pool (or identity)
            modules.update(_conv_bn(f"blocks.{n}.short", f"{dst}.downsample.1", f"{dst}.downsample.2"))
            n += 1
    return modules


def _res2net_vd_modules(model: nn.Module) -> dict[str, str]:
    """PaddleClas Res2Net_vd (conv1_1..3, bb_S_I with resXY_branch2b_K, out) -> timm ResNet of Bottle2neck."""
    c, b = "_conv", "_batch_norm"
    modules = {**_conv_bn("conv1_1", "conv1.0", "conv1.1", c, b), **_conv_bn("conv1_2", "conv1.3", "conv1.4", c, b),
               **_conv_bn("conv1_3", "conv1.6", "bn1", c, b), "out": "fc"}
    deep = len(model.layer3) > 6  # PaddleClas names stage 3 of its 101/152/200 res4a, res4b1, res4b2 ...
    for s in range(4):
        for i, block in enumerate(getattr(model, f"layer{s + 1}")):
            src, dst = f"bb_{s}_{i}", f"layer{s + 1}.{i}"
            tag = (("a" if i == 0 else f"b{i}") if deep and s == 2 else chr(97 + i))
            modules.update(_conv_bn(f"{src}.conv0", f"{dst}.conv1", f"{dst}.bn1", c, b))
            for k in range(len(block.convs)):
                modules.update(_conv_bn(f"{src}.res{s + 2}{tag}_branch2b_{k + 1}", f"{dst}.convs.{k}",
                                        f"{dst}.bns.{k}", c, b))
            modules.update(_conv_bn(f"{src}.conv2", f"{dst}.conv3", f"{dst}.bn3", c, b))
            modules.update(_conv_bn(f"{src}.short", f"{dst}.downsample.1", f"{dst}.downsample.2", c, b))
    return modules


def _resnext_wsl_modules(model: nn.Module) -> dict[str, str]:
    """PaddleClas ResNeXt101_wsl (_conv_stem, _convS_I._conv0..2/_short, _out) -> timm ResNeXt (torchvision)."""
    c, b = "_conv", "_bn"
    modules = {**_conv_bn("_conv_stem", "conv1", "bn1", c, b), "_out": "fc"}
    for s in range(1, 5):
        for i in range(len(getattr(model, f"layer{s}"))):
            src, dst = f"_conv{s}_{i}", f"layer{s}.{i}"
            for k in range(3):
                modules.update(_conv_bn(f"{src}._conv{k}", f"{dst}.conv{k + 1}", f"{dst}.bn{k + 1}", c, b))
            modules.update(_conv_bn(f"{src}._short._conv", f"{dst}.downsample.0", f"{dst}.downsample.1", c, b))
    return modules


def _mobilenetv1_modules(model: nn.Module) -> dict[str, str]:
    """PaddleClas MobileNetV1 (conv, blocks.i.depthwise_conv/pointwise_conv, fc) -> timm EfficientNet."""
    modules = {**_conv_bn("conv", "conv_stem", "bn1"), "fc": "classifier"}
    for i, dst in enumerate(_flat_blocks(model)):
        modules.update(_conv_bn(f"blocks.{i}.depthwise_conv", f"{dst}.conv_dw", f"{dst}.bn1"))
        modules.update(_conv_bn(f"blocks.{i}.pointwise_conv", f"{dst}.conv_pw", f"{dst}.bn2"))
    return modules


def _mobilenetv2_modules(model: nn.Module) -> dict[str, str]:
    """PaddleClas MobileNetV2 (conv1, convG._first_block / convG.convG_K, conv9, out) -> timm EfficientNet."""
    c, b = "_conv", "_batch_norm"
    modules = {**_conv_bn("conv1", "conv_stem", "bn1", c, b), **_conv_bn("conv9", "conv_head", "bn2", c, b),
               "out": "classifier"}
    for s, stage in enumerate(model.blocks):
        for j in range(len(stage)):
            src = f"conv{s + 2}." + ("_first_block" if j == 0 else f"conv{s + 2}_{j + 1}")
            dst = f"blocks.{s}.{j}"
            for part, conv, bn in (("_expand_conv", "conv_pw", "bn1"), ("_bottleneck_conv", "conv_dw", "bn2"),
                                   ("_linear_conv", "conv_pwl", "bn3")):
                modules.update(_conv_bn(f"{src}.{part}", f"{dst}.{conv}", f"{dst}.{bn}", c, b))
    return modules


def _mobilenetv3_modules(model: nn.Module) -> dict[str, str]:
    """PaddleClas MobileNetV3 (conv, blocks.i, last_second_conv, last_conv, fc) -> timm MobileNetV3."""
    blocks = _flat_blocks(model)
    residual, last = blocks[:-1], blocks[-1]  # last: the 960/576-channel 1x1 ConvBnAct
    modules = {"conv.conv": "conv_stem", "conv.bn": "bn1", "last_second_conv.conv": f"{last}.conv",
               "last_second_conv.bn": f"{last}.bn1", "last_conv": "conv_head", "fc": "classifier"}
    parts = (("expand_conv.conv", "conv_pw"), ("expand_conv.bn", "bn1"), ("bottleneck_conv.conv", "conv_dw"),
             ("bottleneck_conv.bn", "bn2"), ("mid_se.conv1", "se.conv_reduce"), ("mid_se.conv2", "se.conv_expand"),
             ("linear_conv.conv", "conv_pwl"), ("linear_conv.bn", "bn3"))
    for i, dst in enumerate(residual):
        for src_part, dst_part in parts:
            modules[f"blocks.{i}.{src_part}"] = f"{dst}.{dst_part}"
    return modules


_LCNET_PADDLE_STAGES = (("blocks2", 1), ("blocks3", 2), ("blocks4", 2), ("blocks5", 6), ("blocks6", 2))


def _lcnet_modules(model: nn.Module) -> dict[str, str]:
    """PP-LCNet (conv1, blocks2..6.i.dw_conv/se/pw_conv, last_conv, fc) -> timm MobileNetV3 of dsa blocks."""
    sources = [f"{stage}.{i}" for stage, n in _LCNET_PADDLE_STAGES for i in range(n)]
    modules = {**_conv_bn("conv1", "conv_stem", "bn1"), "last_conv": "conv_head", "fc": "classifier"}
    for src, dst in zip(sources, _flat_blocks(model)):
        modules.update(_conv_bn(f"{src}.dw_conv", f"{dst}.conv_dw", f"{dst}.bn1"))
        modules.update(_conv_bn(f"{src}.pw_conv", f"{dst}.conv_pw", f"{dst}.bn2"))
        modules.update({f"{src}.se.conv1": f"{dst}.se.conv_reduce", f"{src}.se.conv2": f"{dst}.se.conv_expand"})
    return modules


_HGNETV2_RENAMES = (("aggregation.0", "aggregation_squeeze_conv"), ("aggregation.1", "aggregation_excitation_conv"))
_HGNETV2_HEAD = {"head.last_conv.0": "last_conv", "head.last_conv.2": "lab", "head.fc": "fc"}


def _hgnetv2_modules(model: nn.Module) -> dict[str, str]:
    """PP-HGNetV2 -> timm hgnetv2_b*: the same module paths except the aggregation pair and the head."""
    modules = {}
    for name, module in model.named_modules():
        if not name or not (list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))):
            continue
        src = _HGNETV2_HEAD.get(name, name)
        for timm_part, paddle_part in _HGNETV2_RENAMES:
            src = src.replace(f".{timm_part}.", f".{paddle_part}.")
        modules[src] = name
    return modules


MODULE_MAPS = {"resnet_vd": _resnet_vd_modules, "res2net_vd": _res2net_vd_modules, "resnext_wsl": _resnext_wsl_modules,
               "mobilenetv1": _mobilenetv1_modules, "mobilenetv2": _mobilenetv2_modules,
               "mobilenetv3": _mobilenetv3_modules, "lcnet": _lcnet_modules, "hgnetv2": _hgnetv2_modules}


def _show(items: list[str], limit: int = 12) -> str:
    return "; ".join(items[:limit]) + (f"; (+{len(items) - limit} more)" if len(items) > limit else "")


def convert_state_dict(paddle_state: dict[str, np.ndarray], arch: PaddleArch, model: nn.Module,
                       source: str = "the weights") -> dict[str, torch.Tensor]:
    """Paddle arrays -> a complete state dict for `model` (raises ConversionError naming every misfit)."""
    modules = MODULE_MAPS[arch.family](model)
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    placed: set[str] = set()
    unplaced, clashes, shapes = [], [], []
    for key, array in paddle_state.items():
        module, _, param = key.rpartition(".")
        dst = f"{modules[module]}.{PARAM_NAMES[param]}" if module in modules and param in PARAM_NAMES else None
        if dst is None or dst not in expected:
            unplaced.append(f"{key} {tuple(array.shape)}")
            continue
        if dst in placed:
            clashes.append(f"{key} -> {dst}")
            continue
        placed.add(dst)
        tensor = torch.from_numpy(np.array(array, copy=True))
        if modules[module] in linear and param == "weight":
            tensor = tensor.T  # Paddle Linear stores [in, out]
            if arch.inference_dropout:
                tensor = tensor * (1.0 - arch.inference_dropout)
        if tuple(tensor.shape) != tuple(expected[dst].shape):
            shapes.append(f"{key} {tuple(array.shape)} -> {dst} {tuple(expected[dst].shape)}")
            continue
        out[dst] = tensor.to(expected[dst].dtype).contiguous()
    missing = []
    for dst, value in expected.items():
        if dst.endswith("num_batches_tracked") and dst not in placed:
            out[dst] = torch.zeros_like(value)
        elif dst not in placed:
            missing.append(f"{dst} {tuple(value.shape)}")
    if unplaced or clashes or shapes or missing:
        problems = [f"{len(unplaced)} Paddle tensors have no place in the model: {_show(unplaced)}" if unplaced else "",
                    f"mapped twice: {_show(clashes)}" if clashes else "",
                    f"shape mismatch: {_show(shapes)}" if shapes else "",
                    f"{len(missing)} model tensors got no Paddle weight: {_show(missing)}" if missing else ""]
        raise ConversionError(f"{source} does not fit {arch.paddle_name} -> {arch.timm_arch}: "
                              + " | ".join(p for p in problems if p)
                              + f". Is it a PaddleClas {arch.paddle_name} (legendary_models) state dict?")
    return out


def _num_classes(paddle_state: dict[str, np.ndarray], arch: PaddleArch, source: str) -> int:
    bias = paddle_state.get(f"{arch.classifier}.bias")
    if bias is None or bias.ndim != 1:
        raise ConversionError(f"{source} has no classifier '{arch.classifier}.bias'; expected a full PaddleClas "
                              f"{arch.paddle_name} state dict")
    return int(bias.shape[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_pdparams(path, arch_name: str, num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Build the timm model for `arch_name`, fill it from a .pdparams file, and describe it as a student."""
    path = Path(path)
    arch = get_paddle_arch(arch_name)
    paddle_state = load_pdparams(path)
    found = _num_classes(paddle_state, arch, path.name)
    if num_classes is not None and num_classes != found:
        raise ConversionError(f"{path.name} has a {found}-class classifier but --num-classes is {num_classes}; "
                              "convert as is, then load_student(..., num_classes=N) re-initialises the classifier")
    model = timm.create_model(arch.timm_arch, num_classes=found)
    model.load_state_dict(convert_state_dict(paddle_state, arch, model, path.name), strict=True)
    model.eval()
    # PaddleClas eval: resize 256, center crop 224 (crop_pct 0.875), ImageNet mean/std, bilinear.
    prep = preprocessing(224, test_input_size=224)
    pretrain = dict(source="PaddleClas", file=path.name, sha256=_sha256(path), paddle_arch=arch.paddle_name)
    meta = build_meta(arch.name, found, arch=arch.timm_arch, model=model,
                      preprocessing=prep, pretrain=pretrain)
    return model, meta
