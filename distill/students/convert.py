"""Convert PaddleClas weights (.pdparams) into a student artifact.

    python -m distill.convert ResNet50_vd_ssld_pretrained.pdparams --arch r50_vd -o r50_vd_ssld.safetensors

Names are PaddleClas's legendary_models state-dict keys (`blocks.3.conv1.bn._mean`). The mapping is
per module path and must be complete: every Paddle tensor lands in exactly one model tensor and every
model tensor is filled (BatchNorm's num_batches_tracked, which Paddle lacks, is set to 0).
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn

from distill.students import paddle_models  # noqa: F401  registers the PaddleClas-compatible timm models
from distill.students.artifact import build_meta, default_preprocessing, save_student
from distill.core.errors import UserError, run_cli
from distill.students.pdparams import load_pdparams

# Paddle's Dropout(p=0.2, mode="downscale_in_infer") in PaddleClas MobileNetV3 scales the classifier
# input by 0.8 at inference; timm's dropout is identity at inference, so the classifier absorbs it.
PADDLE_MV3_DROPOUT = 0.2

# Paddle parameter names -> torch names (Conv2D/Linear weight+bias, BatchNorm affine + running stats).
PARAM_NAMES = {"weight": "weight", "bias": "bias", "_mean": "running_mean", "_variance": "running_var"}


class ConversionError(UserError):
    pass


@dataclass(frozen=True)
class PaddleArch:
    name: str          # our zoo name
    paddle_name: str   # PaddleClas model name
    timm_arch: str     # timm model whose state dict the weights fill unchanged
    family: str        # module-path mapping: resnet_vd | mobilenetv3


PADDLE_ARCHS = {a.name: a for a in [
    PaddleArch("r50_vd", "ResNet50_vd", "resnet50d", "resnet_vd"),
    PaddleArch("r101_vd", "ResNet101_vd", "resnet101d", "resnet_vd"),
    PaddleArch("r152_vd", "ResNet152_vd", "resnet152d", "resnet_vd"),
    PaddleArch("r200_vd", "ResNet200_vd", "resnet200d_paddle", "resnet_vd"),  # depths differ from resnet200d
    PaddleArch("mv3_large", "MobileNetV3_large_x1_0", "mobilenetv3_large_100_paddle", "mobilenetv3"),
    PaddleArch("mv3_small", "MobileNetV3_small_x1_0", "mobilenetv3_small_100_paddle", "mobilenetv3"),
]}


def get_paddle_arch(name: str) -> PaddleArch:
    """Our zoo name (`r50_vd`) or the PaddleClas name (`ResNet50_vd`)."""
    for arch in PADDLE_ARCHS.values():
        if name in (arch.name, arch.paddle_name):
            return arch
    supported = ", ".join(f"{a.name} ({a.paddle_name})" for a in PADDLE_ARCHS.values())
    raise ConversionError(f"unknown --arch {name!r}; supported: {supported}. ResNet18_vd/34_vd have an extra "
                          "projection in stage 1 that timm's resnet18d/34d lack, so they are not converted yet")


def _resnet_vd_modules(model: nn.Module) -> dict[str, str]:
    """PaddleClas ResNet_vd (stem.i, blocks.n.conv0..2/short, fc) -> timm ResNet-D (conv1, layerS.B, fc)."""
    modules = {"stem.0.conv": "conv1.0", "stem.0.bn": "conv1.1", "stem.1.conv": "conv1.3",
               "stem.1.bn": "conv1.4", "stem.2.conv": "conv1.6", "stem.2.bn": "bn1", "fc": "fc"}
    n = 0
    for stage in range(1, 5):
        for b in range(len(getattr(model, f"layer{stage}"))):
            dst = f"layer{stage}.{b}"
            for i in range(3):  # Bottleneck: Paddle conv0/1/2 = timm conv1/bn1 .. conv3/bn3
                modules[f"blocks.{n}.conv{i}.conv"] = f"{dst}.conv{i + 1}"
                modules[f"blocks.{n}.conv{i}.bn"] = f"{dst}.bn{i + 1}"
            modules[f"blocks.{n}.short.conv"] = f"{dst}.downsample.1"  # downsample.0: avg pool / identity
            modules[f"blocks.{n}.short.bn"] = f"{dst}.downsample.2"
            n += 1
    return modules


def _mobilenetv3_modules(model: nn.Module) -> dict[str, str]:
    """PaddleClas MobileNetV3 (conv, blocks.i, last_second_conv, last_conv, fc) -> timm MobileNetV3."""
    stages = list(model.blocks)
    residual = [f"blocks.{s}.{j}" for s in range(len(stages) - 1) for j in range(len(stages[s]))]
    last = f"blocks.{len(stages) - 1}.0"  # the 960/576-channel 1x1 ConvBnAct
    modules = {"conv.conv": "conv_stem", "conv.bn": "bn1", "last_second_conv.conv": f"{last}.conv",
               "last_second_conv.bn": f"{last}.bn1", "last_conv": "conv_head", "fc": "classifier"}
    parts = (("expand_conv.conv", "conv_pw"), ("expand_conv.bn", "bn1"), ("bottleneck_conv.conv", "conv_dw"),
             ("bottleneck_conv.bn", "bn2"), ("mid_se.conv1", "se.conv_reduce"), ("mid_se.conv2", "se.conv_expand"),
             ("linear_conv.conv", "conv_pwl"), ("linear_conv.bn", "bn3"))
    for i, dst in enumerate(residual):
        for src_part, dst_part in parts:
            modules[f"blocks.{i}.{src_part}"] = f"{dst}.{dst_part}"
    return modules


MODULE_MAPS = {"resnet_vd": _resnet_vd_modules, "mobilenetv3": _mobilenetv3_modules}


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
            if arch.family == "mobilenetv3":
                tensor = tensor * (1.0 - PADDLE_MV3_DROPOUT)
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
    bias = paddle_state.get("fc.bias")
    if bias is None or bias.ndim != 1:
        raise ConversionError(f"{source} has no classifier 'fc.bias'; expected a full PaddleClas "
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
    preprocessing = dict(default_preprocessing(224), test_input_size=224)
    pretrain = dict(source="PaddleClas", file=path.name, sha256=_sha256(path), paddle_arch=arch.paddle_name)
    meta = build_meta(arch.name, found, arch=arch.timm_arch, model=model,
                      preprocessing=preprocessing, pretrain=pretrain)
    return model, meta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill.convert", description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="PaddleClas .pdparams file (paddle.save of a legendary_models state dict)")
    parser.add_argument("--arch", required=True,
                        help=f"model the weights belong to: {', '.join(PADDLE_ARCHS)} (or the PaddleClas name)")
    parser.add_argument("-o", "--output", help="student artifact to write (default: WEIGHTS with .safetensors)")
    parser.add_argument("--num-classes", type=int, help="expected classifier size (default: read from the weights)")
    args = parser.parse_args(argv)
    weights = Path(args.weights)
    output = Path(args.output) if args.output else weights.with_suffix(".safetensors")
    model, meta = convert_pdparams(weights, args.arch, args.num_classes)
    save_student(output, model, meta)
    print(f"wrote {output}: {meta['arch']}, {meta['num_classes']} classes, from {weights.name}")


if __name__ == "__main__":
    run_cli(main)
