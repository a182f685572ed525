"""Classify image files with a student: top-k class names and probabilities at the artifact's preprocessing.

    python -m distill.predict --student r50_vd_ssld photo.jpg folder/ [--top-k 5 --size 288 --csv out.csv]

Images are decoded by distill.core.images and transformed by the artifact's test transform (resize to
size / crop_pct, centre crop) at its test resolution unless --size says otherwise. Class names come from
the artifact (`distill.students.artifact.class_names`); an artifact without them prints class_0, class_1, ...
Unreadable images are skipped and counted, as the trainers do. A folder is searched recursively and its
predictions also go to a CSV (predictions.csv in the current folder unless --csv names one).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from distill.core.atomic import atomic_write
from distill.core.errors import ArgumentParser, UserError, number_in, run_cli
from distill.core.image_folder import images_under
from distill.core.images import ListDataset, collate_skipping
from distill.students.artifact import class_names, load_student, preprocess

DEFAULT_CSV = "predictions.csv"


def image_files(inputs) -> tuple[list[Path], bool]:
    """The files to classify: each file as given (its decoder decides whether it is an image) and every file
    with an image extension under each folder, sorted. Returns (files, whether a folder was given)."""
    files, folder_given, missing = [], False, []
    for item in map(Path, inputs):
        if item.is_dir():
            folder_given = True
            files += [Path(p) for p in images_under(item)]
        elif item.is_file():
            files.append(item)
        else:
            missing.append(str(item))
    if missing:
        raise UserError(f"no such image or folder: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if not files:
        raise UserError(f"no images in {', '.join(map(str, inputs))} (extensions {', '.join(IMG_EXTENSIONS)})")
    return files, folder_given


def eval_size(meta: dict, size: int | None = None) -> int:
    """`size`, else the artifact's test resolution (the one its test top-1 was measured at)."""
    prep = meta["preprocessing"]
    return int(size or prep.get("test_input_size") or prep["input_size"])


def eval_transform(meta: dict, size: int | None = None):
    """The artifact's evaluation transform (resize to size / crop_pct, centre crop, mean/std) at `size`,
    by default its test resolution."""
    return preprocess(meta["preprocessing"], eval_size(meta, size))


@dataclass
class Predictions:
    """Per readable image its top-k (name, probability) pairs; the unreadable ones with the reason."""
    rows: list[tuple[Path, list[tuple[str, float]]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@torch.inference_mode()
def predict_files(model, meta: dict, files, *, top_k: int = 5, size: int | None = None, batch_size: int = 32,
                  device="cpu", workers: int = 0) -> Predictions:
    """Classify `files` in batches; images that do not decode are skipped (listed in `skipped`)."""
    names = class_names(meta, fallback=True)
    k = min(top_k, len(names))
    dataset = ListDataset([(str(f), i) for i, f in enumerate(files)], eval_transform(meta, size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping)
    model = model.eval().to(device)
    out = Predictions()
    for images, index, skipped in loader:
        out.skipped += [(s.where, s.reason) for s in skipped]
        if not len(images):
            continue
        probs = model(images.to(device)).float().softmax(-1)
        top_p, top_i = probs.topk(k, dim=-1)
        for i, p, c in zip(index.tolist(), top_p.cpu().tolist(), top_i.cpu().tolist()):
            out.rows.append((files[i], [(names[j], q) for j, q in zip(c, p)]))
    return out


def csv_text(predictions: Predictions, k: int) -> str:
    """path, top1_class, top1_prob, ... topk_class, topk_prob: one row per readable image."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path"] + [f"top{r}_{col}" for r in range(1, k + 1) for col in ("class", "prob")])
    for path, top in predictions.rows:
        writer.writerow([str(path)] + [v for name, p in top for v in (name, f"{p:.6f}")])
    return buffer.getvalue()


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m distill.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE|FOLDER", help="image files and folders (searched recursively)")
    parser.add_argument("--student", required=True,
                        help="artifact name or path (also local-dir:FOLDER, hf-hub:ORG/NAME, timm:ARCH)")
    parser.add_argument("--top-k", type=number_in(int, 1), default=5, help="classes per image (default 5, at most all)")
    parser.add_argument("--size", type=number_in(int, 16), help="input resolution (default: the artifact's test resolution)")
    parser.add_argument("--csv", metavar="PATH", help=f"write the predictions here (default for a folder: ./{DEFAULT_CSV})")
    parser.add_argument("--batch-size", type=number_in(int, 1), default=32)
    parser.add_argument("--workers", type=number_in(int, 0), default=0, help="decoding processes (default 0: this one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here; use --device cpu")
    files, folder_given = image_files(args.images)
    model, meta = load_student(args.student)
    result = predict_files(model, meta, files, top_k=args.top_k, size=args.size, batch_size=args.batch_size,
                           device=args.device, workers=args.workers)
    if not result.rows:
        raise UserError(f"none of the {len(files)} image(s) could be read: " + result.skipped[0][1])
    for path, top in result.rows:
        print(f"{path}: " + ", ".join(f"{name} {p:.4f}" for name, p in top))
    k = min(args.top_k, meta["num_classes"])
    csv_path = args.csv or (DEFAULT_CSV if folder_given else None)
    if csv_path:
        text = csv_text(result, k)
        atomic_write(csv_path, lambda tmp: Path(tmp).write_text(text))
    size = eval_size(meta, args.size)
    known = "" if class_names(meta) else " (the artifact records no class names)"
    print(f"classified {len(result.rows)} image(s) at {size} px with {meta.get('name') or meta['arch']}{known}"
          + (f"; skipped {len(result.skipped)} unreadable: " + ", ".join(w for w, _ in result.skipped[:3])
             + (" ..." if len(result.skipped) > 3 else "") if result.skipped else "")
          + (f"; wrote {os.fspath(csv_path)}" if csv_path else ""))


if __name__ == "__main__":
    run_cli(main)
