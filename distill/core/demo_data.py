"""Demo data: the procedural shape scenes of distill.core.demo_scenes written as real JPEG files with class
labels and COCO boxes.

No machine of this project reaches the internet, so demos and tests cannot download a dataset; this
module makes one. The files use the layouts real datasets use (ImageFolder, PaddleClas list files,
COCO json), so the same code paths read them; annotations/instances_SPLIT_main.json keeps only each
image's main object. The same seed gives byte-identical files.

    python -m distill.demo_data OUT_DIR [--classes 8 | --shapes heart,arrow] [--train-per-class 60
        --val-per-class 20 --image-size 96 --seed 0 --clutter 1.0 --unlabeled 0 --unlabeled-empty 0.0
        --val-copies 0 --overwrite]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from distill.core.demo_scenes import (JPEG_QUALITY, SHAPES, is_off_topic, labeled_scene, object_mask,
                                      render_scene, unlabeled_scene)
from distill.core.errors import UserError, run_cli

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
# The data of the one-command demo (python -m distill.demo): `demo` is the pretraining task (the teacher
# learns from every train label, the students see labels for `labeled_per_class` of them plus a pool that
# is half off-topic and holds mirrored copies of val images); `downstream` is the transfer task, four
# shapes the pretraining never shows, 10 labels each. `python -m distill.demo_data OUT --preset NAME`.
PRESETS = {
    "demo": dict(num_classes=8, train_per_class=300, labeled_per_class=40, val_per_class=50, image_size=32,
                 clutter=0.3, unlabeled=3000, unlabeled_empty=0.5, val_copies=40),
    "downstream": dict(shapes=("arrow", "frame", "heart", "semicircle"), train_per_class=10, val_per_class=100,
                       image_size=32, clutter=0.3),
}


# ---------------------------------------------------------------------------------------------------
# Writing the dataset.

def _check(name, value, lo, hi=None):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo or \
            (hi is not None and value > hi):
        expected = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise UserError(f"demo data: {name}={value!r}, expected {expected}")


def _outputs(out: Path):
    return [out / "demo_data.json", out / "train", out / "val", out / "unlabeled", out / "annotations",
            out / "classes.txt", out / "train_list.txt", out / "val_list.txt", out / "unlabeled_list.txt",
            out / "labeled_list.txt"]


def _save_jpeg(image: Image.Image, path: Path, quality: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=quality)


def _coco_annotations(scene, image_id, next_ann_id, class_index):
    anns = []
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        area = float(np.asarray(object_mask(obj, scene.size), np.float64).sum() / 255)
        anns.append({"id": next_ann_id + len(anns), "image_id": image_id,
                     "category_id": class_index[obj.shape] + 1,
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": round(area, 2), "iscrowd": 0})
    return anns




def generate(out_dir, *, num_classes: int = 8, train_per_class: int = 60, val_per_class: int = 20,
             image_size: int = 96, seed: int = 0, unlabeled: int = 0, overwrite: bool = False,
             shapes=None, clutter: float = 1.0, unlabeled_empty: float = 0.0, val_copies: int = 0,
             labeled_per_class: int = 0) -> dict:
    """Write the demo dataset under `out_dir` and return a summary dict (counts, classes, paths).

    shapes: class names to use instead of the first `num_classes` of SHAPES (a downstream task with
    classes a pretraining set never had). clutter: nuisance level in [0, 1] (see demo_scenes.sample_scene).
    unlabeled_empty: share of pool images without a main object (off-topic images mining should skip).
    val_copies: also put this many mirrored, re-compressed copies of val images into the pool (what
    deduplication against val must find). labeled_per_class: also write labeled_list.txt, the first N
    train images of each class (the labels a student may use when the teacher had them all).
    The last file written is demo_data.json (this summary): its presence means the set is complete.
    """
    classes = _classes(shapes, num_classes)
    _check_settings(len(classes), train_per_class, val_per_class, image_size, seed, unlabeled, clutter,
                    unlabeled_empty, val_copies, labeled_per_class)
    out = _prepare_folder(Path(out_dir), overwrite)
    start = time.perf_counter()
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    draw = dict(seed=seed, classes=classes, image_size=image_size, clutter=clutter)
    train, train_lines, _ = _write_labeled_split(out, "train", train_per_class, **draw)
    labeled = _write_labeled_subset(out, train_lines, train_per_class, labeled_per_class) if labeled_per_class else {}
    val, _, val_scenes = _write_labeled_split(out, "val", val_per_class, **draw)
    copies = [val_scenes[j * len(val_scenes) // val_copies] for j in range(val_copies)]  # every class
    pool = _write_pool(out, unlabeled, unlabeled_empty, copies, **draw)
    # in the key order demo_data.json has always had (the same seed, the same bytes)
    summary = {"out_dir": str(out), "classes": classes, "image_size": image_size, "seed": seed, "clutter": clutter,
               **({"labeled": labeled} if labeled else {}), "train": train, "val": val, "unlabeled": pool,
               "seconds": round(time.perf_counter() - start, 3)}
    _write_record(out, summary)
    return summary


def _classes(shapes, num_classes: int) -> list[str]:
    """The class names in label order (alphabetical, as ImageFolder assigns): `shapes`, or the first
    `num_classes` of SHAPES."""
    if shapes is None:
        _check("num_classes", num_classes, 1, len(SHAPES))
        return sorted(SHAPES[:num_classes])
    shapes = [shapes] if isinstance(shapes, str) else list(shapes)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or len(set(shapes)) != len(shapes) or not shapes:
        raise UserError(f"demo data: shapes={shapes!r}; expected distinct names from {', '.join(SHAPES)}")
    return sorted(shapes)


def _check_settings(num_classes, train_per_class, val_per_class, image_size, seed, unlabeled, clutter,
                    unlabeled_empty, val_copies, labeled_per_class) -> None:
    """Every setting, before a file is touched."""
    _check("train_per_class", train_per_class, 1)
    _check("val_per_class", val_per_class, 1)
    _check("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    _check("seed", seed, 0)
    _check("unlabeled", unlabeled, 0)
    for name, value in (("clutter", clutter), ("unlabeled_empty", unlabeled_empty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise UserError(f"demo data: {name}={value!r}, expected a number in 0..1")
    _check("val_copies", val_copies, 0)
    _check("labeled_per_class", labeled_per_class, 0, train_per_class)
    if val_copies > num_classes * val_per_class:
        raise UserError(f"demo data: val_copies={val_copies} but val has only {num_classes * val_per_class} images")


def _prepare_folder(out: Path, overwrite: bool) -> Path:
    """Refuse to write over demo data unless told to; then remove what a previous set left."""
    if out.exists() and not out.is_dir():
        raise UserError(f"demo data: {out} exists and is not a directory")
    existing = [p for p in _outputs(out) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"demo data: {out} already holds demo data ({existing[0].name}); "
                        "pass overwrite=True (CLI: --overwrite) to replace it, or choose another folder")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_labeled_split(out: Path, split: str, per_class: int, *, seed, classes, image_size, clutter):
    """SPLIT/CLASS/ID.jpg, SPLIT_list.txt and the split's COCO files; returns the split's summary, its list
    lines and its scenes, in label order."""
    class_index = {name: i for i, name in enumerate(classes)}
    images, annotations, lines, scenes = [], [], [], []
    for label, name in enumerate(classes):
        for i in range(per_class):
            image_id = len(images) + 1
            scene = labeled_scene(seed, split, label, i, classes, image_size, clutter)
            scenes.append(scene)
            rel = f"{split}/{name}/{image_id:06d}.jpg"
            _save_jpeg(render_scene(scene), out / rel, scene.jpeg_quality)
            images.append({"id": image_id, "file_name": rel, "width": image_size, "height": image_size})
            annotations += _coco_annotations(scene, image_id, len(annotations) + 1, class_index)
            lines.append(f"{rel} {label}\n")
    (out / f"{split}_list.txt").write_text("".join(lines))
    coco = _write_coco(out, split, images, annotations, classes, seed)
    summary = {"images": len(images), "objects": len(annotations), "folder": str(out / split),
               "list": str(out / f"{split}_list.txt"), "coco": str(coco)}
    return summary, lines, scenes


def _write_labeled_subset(out: Path, lines: list[str], per_class: int, labeled_per_class: int) -> dict:
    """labeled_list.txt: the first `labeled_per_class` train images of each class."""
    keep = [line for k, line in enumerate(lines) if k % per_class < labeled_per_class]
    (out / "labeled_list.txt").write_text("".join(keep))
    return {"images": len(keep), "list": str(out / "labeled_list.txt")}


def _write_coco(out: Path, split: str, images, annotations, classes, seed) -> Path:
    """annotations/instances_SPLIT.json, and instances_SPLIT_main.json with each image's main object alone
    (its first annotation): a detection task whose every box is large enough to see at small image sizes,
    where distractors shrink to a few pixels."""
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(classes)]
    coco = {"info": {"description": f"ssld-kit demo shapes ({split}, seed {seed})"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}
    path = out / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(coco))
    first = {}
    for a in annotations:
        first.setdefault(a["image_id"], a)
    main_only = dict(coco, annotations=[dict(a, id=k + 1) for k, a in enumerate(first.values())])
    (out / "annotations" / f"instances_{split}_main.json").write_text(json.dumps(main_only))
    return path


def _write_pool(out: Path, unlabeled: int, empty_share: float, copies: list, *, seed, classes, image_size,
                clutter) -> dict:
    """unlabeled/ and unlabeled_list.txt: `unlabeled` pool scenes, then `copies` (val scenes) mirrored and
    re-compressed at another quality, inserted at evenly spread positions of the list."""
    lines, off_topic = [], 0
    for i in range(unlabeled):
        scene = unlabeled_scene(seed, i, classes, image_size, clutter, empty_share)
        off_topic += is_off_topic(seed, i, empty_share)
        rel = f"unlabeled/{i + 1:06d}.jpg"
        _save_jpeg(render_scene(scene), out / rel, scene.jpeg_quality)
        lines.append(rel + "\n")
    for j, scene in enumerate(copies):
        rel = f"unlabeled/copy_{j + 1:06d}.jpg"
        image = render_scene(scene).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        _save_jpeg(image, out / rel, JPEG_QUALITY[0] + (scene.jpeg_quality - JPEG_QUALITY[0] + 25) % 51)
        lines.insert((j * (len(lines) + 1)) // max(len(copies), 1) + j, rel + "\n")
    if lines:
        (out / "unlabeled_list.txt").write_text("".join(lines))
    return {"images": len(lines), "off_topic": off_topic, "val_copies": len(copies),
            "list": str(out / "unlabeled_list.txt") if lines else None}


def _write_record(out: Path, summary: dict) -> None:
    """demo_data.json, written last (its presence means the set is complete): the summary with paths relative
    to the folder and no timing, so that the same seed still gives byte-identical files."""
    record = json.loads(json.dumps({k: v for k, v in summary.items() if k not in ("seconds", "out_dir")}),
                        object_hook=lambda d: {k: _relative(v, out) for k, v in d.items()})
    (out / "demo_data.json").write_text(json.dumps(record, indent=1))


def _relative(value, out: Path):
    return Path(value).relative_to(out).as_posix() if isinstance(value, str) and value.startswith(str(out)) else value


def format_summary(summary: dict) -> str:
    s = summary
    text = [f"demo data in {s['out_dir']}: {len(s['classes'])} classes ({', '.join(s['classes'])}), "
            f"{s['image_size']} px, seed {s['seed']}"]
    for split in ("train", "val"):
        d = s[split]
        text.append(f"  {split}: {d['images']} images, {d['objects']} boxes -> {d['folder']}/, "
                    f"{d['list']}, {d['coco']}")
    if s.get("labeled"):
        text.append(f"  labeled subset: {s['labeled']['images']} images -> {s['labeled']['list']}")
    if s["unlabeled"]["images"]:
        u = s["unlabeled"]
        extra = [f"{u[k]} {what}" for k, what in (("off_topic", "off-topic"), ("val_copies", "copies of val images"))
                 if u.get(k)]
        text.append(f"  unlabeled: {u['images']} images" + (f" ({', '.join(extra)})" if extra else "")
                    + f" -> {u['list']}")
    text.append(f"  took {s['seconds']:.2f} s")
    return "\n".join(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write (train/, val/, annotations/, list files)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="the settings of python -m distill.demo's data (other flags override them)")
    parser.add_argument("--classes", type=int, dest="num_classes", help=f"number of shape classes, 1..{len(SHAPES)} (8)")
    parser.add_argument("--shapes", help=f"comma-separated class names instead of --classes ({','.join(SHAPES)})")
    parser.add_argument("--train-per-class", type=int, help="(60)")
    parser.add_argument("--labeled-per-class", type=int, help="also list the first N of each class in labeled_list.txt")
    parser.add_argument("--val-per-class", type=int, help="(20)")
    parser.add_argument("--image-size", type=int, help="(96)")
    parser.add_argument("--seed", type=int, help="(0)")
    parser.add_argument("--clutter", type=float, help="nuisance level 0..1 (1, the full difficulty)")
    parser.add_argument("--unlabeled", type=int, help="also write N unlabeled images (0)")
    parser.add_argument("--unlabeled-empty", type=float, help="share of unlabeled images without a main object (0)")
    parser.add_argument("--val-copies", type=int, help="mirrored copies of val images in the pool (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace demo data already in OUT_DIR")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("out_dir", "preset", "overwrite")}
    if "shapes" in given:
        given["shapes"] = given["shapes"].split(",")
    settings = {**(PRESETS[args.preset] if args.preset else {}), **given}
    if "num_classes" in given:
        settings.pop("shapes", None)
    summary = generate(args.out_dir, overwrite=args.overwrite, **settings)
    print(format_summary(summary))


if __name__ == "__main__":
    run_cli(main)
