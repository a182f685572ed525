"""Write a student as a timm / Hugging Face model folder, and optionally push it to the Hub.

    python -m distill.export r50_vd_ssld out/r50_vd_ssld [--push ORG/NAME]

The folder is what timm itself shares: `config.json` (architecture, num_classes, pretrained_cfg with the
student's preprocessing; the artifact metadata under `ssld`) and `model.safetensors` (the state dict, with
the same metadata), so `timm.create_model("local-dir:FOLDER", pretrained=True)` and
`load_student("local-dir:FOLDER")` both read it. Architectures ported from PaddleClas register with timm on
`import distill.students`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from timm.models._hub import save_config_for_hf  # timm.models.push_to_hf_hub writes config.json with it

from distill.core.errors import UserError, run_cli
from distill.students.artifact import FOLDER_WEIGHTS, METADATA_KEY, load_student, save_student

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


def model_card(meta: dict, repo: str | None) -> str:
    pre = meta.get("pretrain") or {}
    name = repo or meta.get("name") or meta["arch"]
    lines = ["---", "library_name: timm", "tags: [image-classification, timm, ssld]", "---", "",
             f"# {meta.get('name') or meta['arch']}", "",
             f"timm architecture `{meta['arch']}`, {meta['num_classes']} classes, trained with ssld-kit.", "",
             "```python", "import distill.students  # registers the PaddleClas-compatible architectures",
             "import timm", f'model = timm.create_model("hf-hub:{name}", pretrained=True)', "```", ""]
    for key in ("source", "teacher", "epochs", "top1", "weight_decay", "weight_decay_kind"):
        if pre.get(key) is not None:
            lines.append(f"- pretrain.{key}: {pre[key]}")
    return "\n".join(lines) + "\n"


def export_folder(student, out_dir, repo: str | None = None) -> Path:
    """Artifact (name, path, local-dir:, hf-hub:) -> OUT_DIR/{config.json, model.safetensors, README.md}."""
    model, meta = load_student(student)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; give an output folder")
    out.mkdir(parents=True, exist_ok=True)
    save_student(out / FOLDER_WEIGHTS, model, meta)
    model.pretrained_cfg = {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items() if k in INPUT_KEYS}
    model.pretrained_cfg["architecture"] = meta["arch"]
    save_config_for_hf(model, str(out / CONFIG), model_config={METADATA_KEY: meta}, data_config=data_config(meta))
    (out / "README.md").write_text(model_card(meta, repo))
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
    parser = argparse.ArgumentParser(prog="python -m distill.export", description=__doc__.splitlines()[0])
    parser.add_argument("student", help="artifact name or path (also local-dir:FOLDER, hf-hub:ORG/NAME)")
    parser.add_argument("out_dir", help="folder to write: config.json + model.safetensors + README.md")
    parser.add_argument("--push", metavar="ORG/NAME", help="also upload the folder to this Hugging Face Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo private")
    args = parser.parse_args(argv)
    out = export_folder(args.student, args.out_dir, args.push)
    config = json.loads((out / CONFIG).read_text())
    print(f"wrote {out}: {config['architecture']}, {config['num_classes']} classes; "
          f'timm.create_model("local-dir:{out}", pretrained=True) loads it')
    if args.push:
        print(f"pushed to {push_folder(out, args.push, args.private)}")


if __name__ == "__main__":
    run_cli(main)
