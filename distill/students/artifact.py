"""The student artifact: one `NAME.safetensors` with a JSON document under the metadata key `ssld`.

This is the contract between distill/ (producer) and transfer/, detection/ (consumers); see DESIGN.md.
Weights are the timm architecture's state dict unchanged, so timm can load the file directly too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from distill.students import zoo
from distill.core.atomic import atomic_write
from distill.core.errors import UserError
from distill.students.stages import LAYOUT_HELP, stage_layout

FORMAT_VERSION = 1
METADATA_KEY = "ssld"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ArtifactError(UserError):
    pass


def ssld_home() -> Path:
    return Path(os.environ.get("SSLD_HOME", Path.home() / ".cache" / "ssld")).expanduser()


def default_test_size(input_size: int) -> int:
    """About 1.15x the train resolution (FixRes), rounded to a multiple of 32 (at least +32)."""
    return max(input_size + 32, int(round(input_size * 1.15 / 32)) * 32)


def default_preprocessing(input_size: int = 224) -> dict:
    # PaddleClas eval: resize short side 256, center crop 224 (crop_pct 0.875), ImageNet mean/std, bilinear.
    return dict(input_size=input_size, test_input_size=default_test_size(input_size), crop_pct=0.875,
                mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), interpolation="bilinear")


def build_meta(name: str, num_classes: int, *, arch: str | None = None, model: nn.Module | None = None,
               **sections) -> dict:
    """Complete metadata for a zoo name (`r50_vd`), `timm:ARCH` or bare timm arch; `sections` override
    top-level keys (preprocessing/pretrain/recommended are merged key by key)."""
    if name in zoo.ZOO or name.startswith("timm:"):
        entry = zoo.get_entry(name)
    else:
        entry = zoo.ZooEntry(name, arch or name, zoo.family_of_arch(arch or name))
    arch = arch or entry.arch
    family = zoo.family_of_arch(arch) if arch != entry.arch else entry.family
    if model is None:
        model = zoo.create_model(arch, num_classes=num_classes)
    meta = dict(
        format_version=FORMAT_VERSION, name=name, arch=arch, num_classes=num_classes,
        stages=dict(family=family, layout=stage_layout(model, family), help=LAYOUT_HELP[family]),
        preprocessing=default_preprocessing(),
        pretrain=dict(weight_decay=None, epochs=None, teacher=None, loss=None, data=None,
                      top1=None, top1_test_res=None),
        recommended=dict(transfer=list(entry.transfer_mult), detection=list(entry.detection_mult)),
    )
    for key, value in sections.items():
        meta[key] = {**meta[key], **value} if isinstance(meta.get(key), dict) and isinstance(value, dict) else value
    return meta


def save_student(path, model: nn.Module, meta: dict) -> Path:
    """Write weights + metadata atomically (a kill mid-write leaves any previous file intact)."""
    for key in ("arch", "num_classes"):
        if key not in meta:
            raise ArtifactError(f"artifact metadata needs {key!r}; build it with distill.students.artifact.build_meta")
    meta = {"format_version": FORMAT_VERSION, **meta}
    # Cloned and contiguous: safetensors refuses shared or strided storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(meta), "format": "pt"}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def known_students() -> list[str]:
    home = ssld_home()
    return sorted(p.stem for p in home.glob("*.safetensors")) if home.is_dir() else []


def resolve_student(name) -> Path:
    """An existing path; else $SSLD_HOME/NAME.safetensors (default ~/.cache/ssld)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    home = ssld_home()
    candidate = home / (path.name if path.suffix == ".safetensors" else f"{path.name}.safetensors")
    if candidate.is_file():
        return candidate
    known = known_students()
    raise ArtifactError(
        f"no student artifact {str(name)!r}: not a file, and not found as {candidate}. "
        f"Searched: the path itself, then {home} (set $SSLD_HOME to change it). "
        f"Known students there: {', '.join(known) if known else 'none'}. "
        "For a plain timm model use timm:ARCH.")


def read_meta(name_or_path) -> dict:
    path = resolve_student(name_or_path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    if METADATA_KEY not in metadata:
        raise ArtifactError(f"{path} has no '{METADATA_KEY}' metadata: not an ssld-kit student artifact "
                            "(convert PaddleClas weights with python -m distill.convert)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: malformed '{METADATA_KEY}' metadata: {e}") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {meta['format_version']}; this ssld-kit reads "
                            f"up to {FORMAT_VERSION}: upgrade ssld-kit")
    return meta


def check_state_dict(model: nn.Module, state: dict, source) -> None:
    """Raise naming every missing, unexpected or differently shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = [f"missing {show(missing)}" if missing else "",
                 f"unexpected {show(unexpected)}" if unexpected else "",
                 f"shape mismatch {show(shapes)}" if shapes else ""]
        raise ArtifactError(f"weights in {source} do not fit the architecture: " + "; ".join(p for p in parts if p))


def load_student(name_or_path, num_classes: int | None = None, pretrained: bool = False,
                 map_location="cpu") -> tuple[nn.Module, dict]:
    """Model + metadata from an artifact path/name, or `timm:ARCH` (random init unless pretrained=True).

    With a different `num_classes`, the classifier is re-initialised and every other tensor is exact.
    """
    if str(name_or_path).startswith("timm:"):
        entry = zoo.get_entry(str(name_or_path))
        n = num_classes or 1000
        model = zoo.create_model(entry.name, num_classes=n, pretrained=pretrained)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        prep = dict(default_preprocessing(size), mean=list(cfg.get("mean", IMAGENET_MEAN)),
                    std=list(cfg.get("std", IMAGENET_STD)), interpolation=cfg.get("interpolation", "bilinear"),
                    crop_pct=float(cfg.get("crop_pct", 0.875)))
        meta = build_meta(entry.name, n, model=model, preprocessing=prep,
                          pretrain=dict(source="timm pretrained" if pretrained else "random init"))
        return model, meta
    path = resolve_student(name_or_path)
    meta = read_meta(path)
    model = zoo.create_model(meta["arch"], num_classes=meta["num_classes"])
    state = load_file(str(path), device=str(map_location))
    check_state_dict(model, state, path)
    model.load_state_dict(state)
    if num_classes is not None and num_classes != meta["num_classes"]:
        model.reset_classifier(num_classes)
        meta = {**meta, "num_classes": num_classes}
    return model, meta

