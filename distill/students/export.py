"""Write a student as a timm / Hugging Face model folder (and an ONNX model), optionally pushed to the Hub.

    python -m distill.export r50_vd_ssld out/r50_vd_ssld [--onnx] [--push ORG/NAME]

The folder is what timm itself shares: `config.json` (architecture, num_classes, the class names as
`label_names`, pretrained_cfg with the student's preprocessing; the artifact metadata under `ssld`) and
`model.safetensors` (the state dict, with the same metadata), so `timm.create_model("local-dir:FOLDER",
pretrained=True)`, `load_student("local-dir:FOLDER")` and Hugging Face transformers
(`AutoModelForImageClassification.from_pretrained(FOLDER)`, `pipeline("image-classification", model=FOLDER)`,
through its timm wrapper) all read it. Architectures ported from PaddleClas (`*_paddle`) register with timm
on `import distill`: transformers users import it first. `--onnx` adds `model.onnx`, kept only if
onnxruntime reproduces PyTorch's outputs (distill.students.onnx_export).
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
from timm.models._hub import save_config_for_hf  # timm.models.push_to_hf_hub writes config.json with it

from distill.core.atomic import atomic_write
from distill.core.errors import ArgumentParser, UserError, number_in, run_cli
from distill.students.artifact import FOLDER_WEIGHTS, METADATA_KEY, class_names, load_student, save_student
from distill.students.onnx_export import ONNX_FILE, TOLERANCE, export_onnx
from distill.students.predict import eval_size

CONFIG = "config.json"
# pretrained_cfg keys that describe how to feed this model; the arch's own timm weights (url, license,
# paper, tag) say nothing about a student's weights and are dropped.
INPUT_KEYS = ("input_size", "fixed_input_size", "crop_pct", "crop_mode", "mean", "std", "interpolation",
              "pool_size", "first_conv", "classifier", "num_classes")


def data_config(meta: dict) -> dict:
    """timm's data config (input size, crop, mean/std, interpolation) from the artifact's preprocessing."""
    prep = meta["preprocessing"]
    size = int(prep["input_size"])
    cfg = dict(input_size=(3, size, size), crop_pct=float(prep["crop_pct"]), mean=tuple(prep["mean"]),
               std=tuple(prep["std"]), interpolation=prep["interpolation"])
    if prep.get("test_input_size") and int(prep["test_input_size"]) != size:
        test = int(prep["test_input_size"])
        cfg["test_input_size"] = (3, test, test)
    return cfg


def registered_by_ssld_kit(arch: str) -> bool:
    """True for the PaddleClas-compatible archs, which timm knows only after `import distill`."""
    return timm.models.model_entrypoint(arch).__module__.startswith("distill.")


def model_card(meta: dict, repo: str | None) -> str:
    pre = meta.get("pretrain") or {}
    name = repo or meta.get("name") or meta["arch"]
    names = class_names(meta)
    register = (["import distill  # registers the PaddleClas-compatible architectures with timm (pip install ssld-kit)"]
                if registered_by_ssld_kit(meta["arch"]) else [])
    lines = ["---", "library_name: timm", "tags: [image-classification, timm, ssld]", "---", "",
             f"# {meta.get('name') or meta['arch']}", "",
             f"timm architecture `{meta['arch']}`, {meta['num_classes']} classes, trained with ssld-kit.", "",
             "```python", *register, "import timm", f'model = timm.create_model("hf-hub:{name}", pretrained=True)', "",
             "from transformers import pipeline  # or AutoModelForImageClassification.from_pretrained",
             f'classify = pipeline("image-classification", model="{name}")', "```", ""]
    if names:
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        lines.append(f"- classes: {shown}" + (f" (from {meta['classes_source']})" if meta.get("classes_source") else ""))
    for key in ("source", "teacher", "epochs", "top1", "weight_decay", "weight_decay_kind"):
        if pre.get(key) is not None:
            lines.append(f"- pretrain.{key}: {pre[key]}")
    return "\n".join(lines) + "\n"


def write_config(model, meta: dict, path) -> Path:
    """timm's config.json, fixed for transformers' timm wrapper: the class names as `label_names` (its
    id2label), and no `num_classes` in `model_args`, which the wrapper passes to timm.create_model next to
    its own num_classes ("got multiple values for keyword argument 'num_classes'"). timm reads
    num_classes from the top level, as its own hub configs have it."""
    names = class_names(meta)
    model_config = {METADATA_KEY: meta, **({"label_names": names} if names else {})}

    def write(tmp: str) -> None:
        save_config_for_hf(model, tmp, model_config=model_config, data_config=data_config(meta))
        config = json.loads(Path(tmp).read_text())
        args = {k: v for k, v in config.pop("model_args", {}).items() if k != "num_classes"}
        config = {**config, **({"model_args": args} if args else {})}
        Path(tmp).write_text(json.dumps(config, indent=2))

    return atomic_write(path, write)


def export_folder(student, out_dir, repo: str | None = None, *, onnx: bool = False, onnx_size: int | None = None,
                  check_images=(), opset: int | None = None, say=print) -> Path:
    """Artifact (name, path, local-dir:, hf-hub:) -> OUT_DIR/{config.json, model.safetensors, README.md}, and
    with `onnx` OUT_DIR/model.onnx first (its measured parity goes to `say`): a failed ONNX check writes nothing."""
    model, meta = load_student(student)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; give an output folder")
    created = not out.exists()
    if onnx:
        try:
            parity = export_onnx(model, meta, out / ONNX_FILE, size=onnx_size, check_images=check_images, opset=opset)
        except BaseException:
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()   # leave no empty folder behind either
            raise
        say(f"wrote {out / ONNX_FILE} ({eval_size(meta, onnx_size)} px, dynamic batch); onnxruntime vs PyTorch: "
            f"{parity.describe()} (limit {TOLERANCE:g})")
    out.mkdir(parents=True, exist_ok=True)
    save_student(out / FOLDER_WEIGHTS, model, meta)
    model.pretrained_cfg = {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items() if k in INPUT_KEYS}
    model.pretrained_cfg["architecture"] = meta["arch"]
    write_config(model, meta, out / CONFIG)
    card = model_card(meta, repo)
    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(card))
    return out


def push_folder(folder, repo: str, private: bool = False) -> str:
    """Upload an exported folder to the Hub repo ORG/NAME (network; needs a token: huggingface-cli login)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push needs the huggingface_hub package: pip install huggingface_hub") from None
    if repo.count("/") != 1:
        raise UserError(f"--push takes ORG/NAME, got {repo!r}")
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Add ssld-kit student")
    except Exception as e:  # auth, network, permissions: huggingface_hub raises many types
        raise UserError(f"pushing {folder} to {repo} failed: {type(e).__name__}: {e}") from None
    return f"https://huggingface.co/{repo}"


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m distill.export", description=__doc__.splitlines()[0])
    parser.add_argument("student", help="artifact name or path (also local-dir:FOLDER, hf-hub:ORG/NAME)")
    parser.add_argument("out_dir", help="folder to write: config.json + model.safetensors + README.md")
    parser.add_argument("--onnx", action="store_true",
                        help=f"also write {ONNX_FILE} (dynamic batch), kept only if onnxruntime matches PyTorch "
                             f"within {TOLERANCE:g} relative")
    parser.add_argument("--onnx-size", type=number_in(int, 16), metavar="PX",
                        help="the ONNX model's input resolution (default: the artifact's test resolution)")
    parser.add_argument("--check-images", nargs="+", metavar="IMAGE|FOLDER", default=(),
                        help="real images for the ONNX check (up to 16; default: generated demo scenes)")
    parser.add_argument("--opset", type=number_in(int, 7), help="ONNX opset (default: torch.onnx's)")
    parser.add_argument("--push", metavar="ORG/NAME", help="also upload the folder to this Hugging Face Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo private")
    args = parser.parse_args(argv)
    if not args.onnx and (args.onnx_size or args.check_images or args.opset):
        raise UserError("--onnx-size, --check-images and --opset apply to the ONNX export: add --onnx")
    out = export_folder(args.student, args.out_dir, args.push, onnx=args.onnx, onnx_size=args.onnx_size,
                        check_images=args.check_images, opset=args.opset)
    config = json.loads((out / CONFIG).read_text())
    names = "class names" if config.get("label_names") else "no class names recorded"
    print(f"wrote {out}: {config['architecture']}, {config['num_classes']} classes ({names}); "
          f'timm.create_model("local-dir:{out}", pretrained=True) and transformers\' from_pretrained("{out}") load it')
    if args.push:
        print(f"pushed to {push_folder(out, args.push, args.private)}")


if __name__ == "__main__":
    run_cli(main)
