"""The student artifact: one `NAME.safetensors` with a JSON document under the metadata key `ssld`.

This is the contract between distill/ (producer) and transfer/, detection/ (consumers).
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
from distill.core.images import build_transform
from distill.students.published import PUBLISHED, convert_command
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
    """About 1.15x the train resolution (FixRes: 224 -> 256), rounded to a multiple that suits the size
    (32 px from 192 up, 8 from 48, else 4) and at least one multiple above it: 32 -> 36, 64 -> 72, never 2x."""
    step = 32 if input_size >= 192 else 8 if input_size >= 48 else 4
    return max(input_size + step, int(round(input_size * 1.15 / step)) * step)


def preprocessing(input_size: int = 224, test_input_size: int | None = None, crop_pct: float = 0.875,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear") -> dict:
    """The artifact's preprocessing block, built here only. Defaults are PaddleClas's eval: resize the short
    side to 256, centre-crop 224 (crop_pct 0.875), ImageNet mean/std, bilinear."""
    return dict(input_size=int(input_size), test_input_size=int(test_input_size or default_test_size(input_size)),
                crop_pct=float(crop_pct), mean=[float(m) for m in mean], std=[float(s) for s in std],
                interpolation=interpolation)


def preprocess(prep: dict, size: int, kind: str = "test", crop_scale=(0.08, 1.0)):
    """An artifact's preprocessing block as a transform at `size`: `test` (resize to size / crop_pct, centre
    crop) to evaluate, predict and for Fix; `random_crop` (+ flip, areas `crop_scale`) to train."""
    return build_transform(kind, size, prep.get("mean", IMAGENET_MEAN), prep.get("std", IMAGENET_STD),
                           crop_pct=float(prep.get("crop_pct", 0.875)), scale=crop_scale,
                           interpolation=prep.get("interpolation", "bilinear"))


def build_meta(name: str, num_classes: int, *, arch: str | None = None, model: nn.Module | None = None,
               **sections) -> dict:
    """Complete metadata for a zoo name (`r50_vd`), `timm:ARCH` or bare timm arch; `sections` override
    top-level keys (preprocessing/pretrain/recommended are merged key by key)."""
    if zoo.is_zoo_name(name):
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
        preprocessing=preprocessing(),
        # weight_decay_kind: "coupled" (L2 in the gradient: PaddleClas, torch SGD) or "decoupled" (AdamW);
        # see distill.students.decay for how consumers reuse it
        pretrain=dict(weight_decay=None, weight_decay_kind=None, weight_decay_source=None, epochs=None,
                      teacher=None, loss=None, data=None, top1=None, top1_test_res=None),
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
    if meta.get("classes") is not None:
        with_classes(meta, meta["classes"], meta.get("classes_source"))  # raises when they do not fit
    meta = {"format_version": FORMAT_VERSION, **meta}
    # Cloned and contiguous: safetensors refuses shared or strided storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(meta), "format": "pt"}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def with_classes(meta: dict, names, source=None) -> dict:
    """A copy of `meta` that records the class names in classifier order (top-level `classes`) and where they
    came from (`classes_source`, e.g. the train folder), so predictions, exports and Hugging Face pipelines
    name classes instead of numbering them. `names=None` records that they are unknown (so a backbone's
    names never pass to a model trained on other data)."""
    if names is None:
        return {**meta, "classes": None, "classes_source": None}
    names = [str(n) for n in names]
    if len(names) != meta["num_classes"]:
        raise ArtifactError(f"{len(names)} class names for a {meta['num_classes']}-class student"
                            + (f" (from {source})" if source else "") + "; give one name per classifier output")
    return {**meta, "classes": names, "classes_source": None if source is None else str(source)}


def class_names(meta: dict, fallback: bool = False) -> list[str] | None:
    """The student's class names: top-level `classes`, else `transfer.classes` (where transfer.finetune
    recorded them before they moved to the top level); None when unknown or when they no longer fit
    `num_classes`. With `fallback`, unknown names read class_0, class_1, ..."""
    for names in (meta.get("classes"), (meta.get("transfer") or {}).get("classes")):
        if isinstance(names, (list, tuple)) and len(names) == meta["num_classes"]:
            return [str(n) for n in names]
    return [f"class_{i}" for i in range(meta["num_classes"])] if fallback else None


def known_students() -> list[str]:
    home = ssld_home()
    return sorted(p.stem for p in home.glob("*.safetensors")) if home.is_dir() else []


LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
FOLDER_WEIGHTS = "model.safetensors"  # timm / Hugging Face model folder: config.json + model.safetensors
TRAIN_RECIPE = "python -m distill.ssld -c configs/r50.yaml, then -c configs/r50_ft.yaml"


def _folder_weights(folder: Path, name) -> Path:
    weights = folder / FOLDER_WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{name}: {folder} has no {FOLDER_WEIGHTS}; expected a folder written by "
                            "python -m distill.export (config.json + model.safetensors)")
    return weights


def _how_to_get(name: str) -> str:

    stem = Path(name).name.removesuffix(".safetensors")
    if stem in PUBLISHED:
        entry = PUBLISHED[stem]
        get = (f"Get it: python -m distill.convert --download {stem} (PaddleClas's published weights), "
               f"or fetch {entry.file} by hand and run {convert_command(entry)}")
    else:
        get = ("Get one: python -m distill.convert --download NAME (python -m distill.zoo lists the names), "
               "or python -m distill.convert FILE.pdparams --arch ARCH")
    return f"{get}; or train one: {TRAIN_RECIPE}. For a plain timm model use timm:ARCH."


def resolve_student(name) -> Path:
    """The artifact file for a path (`./r50_vd_ssld`, `x.safetensors`), a name in the current folder or
    $SSLD_HOME (default ~/.cache/ssld), or the model.safetensors of a timm model folder (`local-dir:FOLDER`,
    `hf-hub:ORG/NAME`, as python -m distill.export writes them)."""
    text = str(name)
    if text.startswith(HF_HUB):
        return _folder_weights(hf_snapshot(text[len(HF_HUB):]), text)
    if text.startswith(LOCAL_DIR):
        folder = Path(text[len(LOCAL_DIR):]).expanduser()
        if not folder.is_dir():
            raise ArtifactError(f"no model folder {folder} (from {text!r}); write one with python -m distill.export")
        return _folder_weights(folder, text)
    path = Path(text).expanduser()
    with_suffix = path if path.suffix == ".safetensors" or not path.name else path.with_name(path.name + ".safetensors")
    home = ssld_home()
    in_home = home / with_suffix.name
    tried = [path, with_suffix] if with_suffix != path else [path]
    bare = len(path.parts) == 1 and not text.startswith(".")
    for candidate in [*tried, *([in_home] if bare else [])]:
        if candidate.is_file():
            return candidate
    if path.is_dir() and (path / FOLDER_WEIGHTS).is_file():
        return path / FOLDER_WEIGHTS
    known = known_students()
    searched = ", ".join(str(p) for p in tried) + (f", then {in_home}" if bare else "")
    raise ArtifactError(
        f"no student artifact {text!r}: looked for {searched} (set $SSLD_HOME to change {home}; "
        f"installed there: {', '.join(known) if known else 'none'}). " + _how_to_get(text))


def read_meta(name_or_path) -> dict:
    path = resolve_student(name_or_path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    if METADATA_KEY not in metadata and path.name == FOLDER_WEIGHTS:
        metadata = _config_metadata(path.parent)  # a model folder keeps the metadata in config.json too
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


def _config_metadata(folder: Path) -> dict:
    config = folder / "config.json"
    try:
        ssld = json.loads(config.read_text()).get(METADATA_KEY) if config.is_file() else None
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return {METADATA_KEY: json.dumps(ssld)} if isinstance(ssld, dict) else {}


def hf_snapshot(repo: str) -> Path:
    """Local folder of hub repo `ORG/NAME[@REVISION]`: config.json + model.safetensors, cached by huggingface_hub."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ArtifactError(f"{HF_HUB}{repo} needs the huggingface_hub package: pip install huggingface_hub") from None
    repo_id, _, revision = repo.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=["config.json", FOLDER_WEIGHTS]))
    except Exception as e:  # offline, unknown repo, auth: huggingface_hub raises many types
        raise ArtifactError(f"cannot fetch {HF_HUB}{repo} from the Hugging Face Hub: {type(e).__name__}: {e}") from None


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
    """Model + metadata from an artifact path/name, `local-dir:FOLDER` / `hf-hub:ORG/NAME` (a model folder
    written by python -m distill.export), or `timm:ARCH` (random init unless pretrained=True).

    With a different `num_classes`, the classifier is re-initialised (and the class names dropped) and every
    other tensor is exact. `class_names(meta)` gives the names, None for older artifacts without them.
    """
    if str(name_or_path).startswith(zoo.TIMM_PREFIX):
        entry = zoo.get_entry(str(name_or_path))
        n = num_classes or 1000
        model = zoo.create_model(entry.name, num_classes=n, pretrained=pretrained)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        prep = preprocessing(size, mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
                             interpolation=cfg.get("interpolation", "bilinear"), crop_pct=cfg.get("crop_pct", 0.875))
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
        meta = {k: v for k, v in meta.items() if k not in ("classes", "classes_source")}  # a new classifier
        meta["num_classes"] = num_classes
    return model, meta



def read_weights(source) -> tuple[dict, dict, str]:
    """(state dict, metadata, where) of a student artifact, or of a trainer checkpoint (.pt/.pth) that keeps
    the metadata with its task state (distill.ssld does): what `student.init` and `teacher.models` take."""
    if Path(str(source)).suffix in (".pt", ".pth"):
        from distill.core.checkpoint import load_checkpoint
        ckpt = load_checkpoint(source)
        # distill.ssld keeps the metadata with its task state; a hand-made {"model", "meta"} file works too
        meta = (ckpt.get("extra", {}).get("meta") or ckpt.get("meta")) if isinstance(ckpt, dict) else None
        if meta is None or "model" not in ckpt:
            raise ArtifactError(f"{source} is not an ssld-kit trainer checkpoint (no model / metadata entries); "
                                "give an artifact (python -m distill.ssld exports one) or a timm:ARCH name")
        return ckpt["model"], meta, str(source)
    path = resolve_student(source)
    return load_file(str(path)), read_meta(path), str(path)
