"""Detection speed, side by side in one run: train s/iter and img/s, eval img/s for Faster / Cascade x
r50_vd / mv3_large at 640 px, batch 2, next to torchvision's fasterrcnn_resnet50_fpn on the same input;
then COCO-eval time of faster-coco-eval vs pycocotools on the same detections.

    python -m detection.bench [--iters 3 --warmup 1 --device cuda --out detection_bench.md]

Backbones start from random weights (speed does not depend on them) with FrozenBN and the zoo's detection
multipliers, as when fine-tuning a student. Inputs are demo-shape scenes drawn at 640 px with their boxes.
"""
from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.students import zoo
from distill.students.artifact import build_meta
from distill.core.errors import run_cli

from .coco_eval import coco_box_metrics
from .config import DEFAULTS
from .data import load_coco, read_image
from .model import build_detector

BACKBONES = {"r50_vd": "resnet50d", "mv3": "mobilenetv3_large_100"}
NUM_CLASSES = 80


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(model, images, targets, device, iters: int, warmup: int) -> dict:
    """Seconds per train iteration (forward + backward + SGD step) and eval images per second."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    model.train()

    def train_step():
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def eval_step():
        with torch.no_grad():
            model(images)

    out = {}
    for name, step in (("train", train_step), ("eval", eval_step)):
        model.train(name == "train")
        for _ in range(warmup):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        synchronize(device)
        out[name] = (time.perf_counter() - start) / iters
    return dict(train_s_iter=out["train"], train_img_s=len(images) / out["train"], eval_img_s=len(images) / out["eval"])


def our_model(arch: str, backbone: str) -> torch.nn.Module:
    entry = zoo.ZOO["mv3_large" if backbone == "mv3" else backbone]
    trunk = zoo.create_model(entry.arch, num_classes=1000)
    meta = build_meta(entry.name, 1000, model=trunk)
    cfg = dict(copy.deepcopy(DEFAULTS["model"]), arch=arch, frozen_bn=True)
    return build_detector(cfg, NUM_CLASSES, trunk, meta)


def torchvision_model() -> torch.nn.Module:
    from timm.layers import freeze_batch_norm_2d
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1,
                                    min_size=640, max_size=1066)   # all layers trainable without weights
    model.backbone.body = freeze_batch_norm_2d(model.backbone.body)   # FrozenBN, as in its pretrained setting
    return model


def demo_batch(batch: int, device):
    from distill.demo_data import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, num_classes=8, train_per_class=1, val_per_class=1, image_size=640, seed=0)
        split = load_coco(Path(tmp) / "annotations" / "instances_train.json", tmp)
        images = [read_image(p).float().div(255).to(device) for p in split.paths[:batch]]
    targets = [dict(boxes=torch.from_numpy(b).to(device), labels=torch.from_numpy(lab).to(device))
               for b, lab in zip(split.boxes[:batch], split.labels[:batch])]
    return images, targets


def synthetic_coco(num_images=1000, per_image=100, seed=0):
    """A COCO ground truth (7 boxes per image, 80 categories) and `per_image` detections per image."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, num_images + 1):
        images.append(dict(id=i, width=640, height=480, file_name=f"{i}.jpg"))
        for _ in range(7):
            x, y = rng.uniform(0, 500, 2)
            w, h = rng.uniform(8, 140, 2)
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=int(rng.integers(1, 81)), bbox=[x, y, w, h],
                             area=w * h, iscrowd=int(rng.random() < 0.01)))
        for j in range(per_image):
            src = anns[-1 - j % 7]["bbox"]
            box = list(np.add(src, rng.normal(0, 6, 4))) if j < 21 else [*rng.uniform(0, 500, 2), *rng.uniform(8, 140, 2)]
            cat = anns[-1 - j % 7]["category_id"] if j < 21 else int(rng.integers(1, 81))
            dets.append(dict(image_id=i, category_id=cat, bbox=[float(v) for v in box], score=float(rng.random())))
    gt = dict(images=images, annotations=anns, categories=[dict(id=c, name=str(c)) for c in range(1, 81)])
    return gt, dets


def bench_coco_eval(num_images: int) -> dict:
    import json

    gt, dets = synthetic_coco(num_images)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gt.json"
        path.write_text(json.dumps(gt))
        out = {}
        for backend in ("faster", "pycocotools"):
            start = time.perf_counter()
            out[backend] = coco_box_metrics(path, dets, backend)
            out[backend + "_s"] = time.perf_counter() - start
    out["equal"] = all(abs(out["faster"][k] - out["pycocotools"][k]) < 1e-9 for k in out["faster"])
    return dict(out, images=num_images, detections=len(dets))


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def report(rows, coco, device, batch, iters) -> str:
    lines = [f"Device: {machine(device)}; torch {torch.__version__}; batch {batch} at 640 px "
             f"(demo scenes, 640x640); mean of {iters} timed iterations after warm-up.", "",
             "| model | train s/iter | train img/s | eval img/s |", "|---|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['train_s_iter']:.3f} | {r['train_img_s']:.2f} | {r['eval_img_s']:.2f} |")
    lines += ["", f"COCO box eval of {coco['detections']:,} detections on {coco['images']} images: "
              f"faster-coco-eval {coco['faster_s']:.2f} s, pycocotools {coco['pycocotools_s']:.2f} s "
              f"({coco['pycocotools_s'] / coco['faster_s']:.1f}x); identical metrics: {coco['equal']} "
              f"(AP {coco['faster']['AP']:.3f})."]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m detection.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per model and mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--coco-images", type=int, default=1000, help="images in the COCO-eval timing")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images, targets = demo_batch(args.batch, device)
    rows = []
    candidates = [(f"{arch} R-CNN {bb}-FPN (ours)", lambda a=arch, b=bb: our_model(a, b))
                  for bb in BACKBONES for arch in ("faster", "cascade")]
    candidates.append(("torchvision fasterrcnn_resnet50_fpn", torchvision_model))
    for name, make in candidates:
        model = make().to(device)
        rows.append((name, bench_model(model, images, targets, device, args.iters, args.warmup)))
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1][1].items()), flush=True)
        del model
    coco = bench_coco_eval(args.coco_images)
    text = report(rows, coco, device, args.batch, args.iters)
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Detection benchmarks\n\n" + text + "\n")
    return text


if __name__ == "__main__":
    run_cli(main)
