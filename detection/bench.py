"""Detection speed, side by side in one run: train s/iter and img/s, eval img/s for Faster / Cascade x
r50_vd / mv3_large at 640 px, batch 2, next to torchvision's fasterrcnn_resnet50_fpn on the same input
at equal work (its proposal counts and RoI sampling set to ours), next to our own previous path
(FrozenBN unfolded, NCHW, torchvision's CPU RoIAlign) and, when detectron2 is installed, next to the same
detectors built by detectron2 (detection.detectron2: the same student trunk under its FPN, RPN and heads, the
same proposal counts and RoI batch); then COCO-eval time of faster-coco-eval vs pycocotools on the same
detections.

    python -m detection.bench [--iters 3 --warmup 1 --device cuda --out detection_bench.md]

Backbones start from random weights (speed does not depend on them) with FrozenBN and the zoo's detection
multipliers, as when fine-tuning a student. Inputs are demo-shape scenes drawn at 640 px with their boxes.
Models take turns, one iteration each per round, so drifting machine load hits all of them alike; on a
CPU the time is this process's CPU time (what the work costs, whatever else runs on the machine).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.students import zoo
from distill.students.artifact import build_meta
from distill.core.benchmark import machine_line, synchronize
from distill.core.errors import run_cli

from .coco_eval import coco_box_metrics
from .config import DEFAULTS
from .data import load_coco, read_image
from .model import RPN_POST_NMS_TRAIN, build_detector

BACKBONES = {"r50_vd": "resnet50d", "mv3": "mobilenetv3_large_100"}
OURS, PREVIOUS = "(ours)", "(ours, previous path: BN unfolded, NCHW, torchvision RoIAlign)"
DETECTRON2 = "(detectron2 engine)"
NUM_CLASSES = 80


class Timed:
    """One model's train step (forward + backward + SGD) and eval forward, timed one iteration at a time."""

    def __init__(self, model, images, targets, device):
        self.model, self.images, self.targets, self.device = model, images, targets, device
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        self.seconds = dict(train=0.0, eval=0.0)
        self.clock = time.perf_counter if device.type == "cuda" else time.process_time

    def train_step(self):
        self.model.train()
        losses = self.model(self.images, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()

    def eval_step(self):
        self.model.eval()
        with torch.inference_mode():
            self.model(self.images)

    def run(self, timed: bool = True):
        for name, step in (("train", self.train_step), ("eval", self.eval_step)):
            synchronize(self.device)
            start = self.clock()
            step()
            synchronize(self.device)
            if timed:
                self.seconds[name] += self.clock() - start

    def result(self, iters: int) -> dict:
        train, evaluate = self.seconds["train"] / iters, self.seconds["eval"] / iters
        n = len(self.images)
        return dict(train_s_iter=train, train_img_s=n / train, eval_img_s=n / evaluate)


def bench_models(makers: dict, images, targets, device, iters: int, warmup: int) -> dict:
    """{name: result}: every model built once, then `iters` alternating rounds (order reversed every round)."""
    timed = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        timed[name] = Timed(make().to(device), images, targets, device)
    for t in timed.values():
        for _ in range(warmup):
            t.run(timed=False)
    names = list(timed)
    for r in range(iters):
        for name in (names if r % 2 == 0 else names[::-1]):
            timed[name].run()
    return {name: t.result(iters) for name, t in timed.items()}


def previous_path(model: torch.nn.Module) -> torch.nn.Module:
    """The same detector as it ran before FrozenBN folding, channels_last and the sparse RoIAlign: the
    reference row."""
    from .backbone import unfold_frozen_bn

    unfold_frozen_bn(model.backbone.body)
    model.backbone.channels_last = False
    model.roi_heads.box_roi_pool.sparse = False
    return model.to(memory_format=torch.contiguous_format)


def our_model(arch: str, backbone: str, size: int = 640) -> torch.nn.Module:
    entry = zoo.ZOO["mv3_large" if backbone == "mv3" else backbone]
    trunk = zoo.create_model(entry.arch, num_classes=1000)
    meta = build_meta(entry.name, 1000, model=trunk)
    cfg = dict(copy.deepcopy(DEFAULTS["model"]), arch=arch, frozen_bn=True, train_sizes=[size], test_size=size,
               max_size=max(size, int(size * 1066 / 640)))
    return build_detector(cfg, NUM_CLASSES, trunk, meta)


class Detectron2Call(torch.nn.Module):
    """A detectron2 model behind the call the timing loop makes: images in [0, 1] (already at the test size,
    as ours receive them) and targets with labels 1..K in; losses (training) or detections out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, targets=None):
        from detectron2.structures import Boxes, Instances
        from detectron2.utils.events import EventStorage

        inputs = [dict(image=image.mul(255)) for image in images]   # detectron2 normalises 0-255 pixels itself
        if targets is None:
            return self.model(inputs)
        for x, image, t in zip(inputs, images, targets):
            x["instances"] = Instances(tuple(image.shape[-2:]), gt_boxes=Boxes(t["boxes"]), gt_classes=t["labels"] - 1)
        with EventStorage():                                       # where its losses log their statistics
            return self.model(inputs)


def detectron2_model(arch: str, backbone: str, device, size: int = 640) -> torch.nn.Module:
    """The same detector through detection.detectron2 (the kit config translated key by key), random trunk
    weights with FrozenBN as `our_model`."""
    import json

    from detectron2.modeling import build_model

    from .detectron2.config import detectron2_config

    entry = zoo.ZOO["mv3_large" if backbone == "mv3" else backbone]
    meta = build_meta(entry.name, 1000)
    model_cfg = dict(copy.deepcopy(DEFAULTS["model"]), arch=arch, frozen_bn=True, train_sizes=[size], test_size=size,
                     max_size=max(size, int(size * 1066 / 640)))
    cfg = dict(copy.deepcopy(DEFAULTS), model=model_cfg, optim=dict(DEFAULTS["optim"], weight_decay=1e-4))
    with tempfile.TemporaryDirectory() as tmp:
        d2 = detectron2_config(cfg, meta, NUM_CLASSES, "", "", tmp, torch.device(device))
    d2.defrost()
    d2.MODEL.SSLD.STUDENT_META = json.dumps(meta)     # the architecture at random init, no file needed
    return Detectron2Call(build_model(d2))


def equal_work() -> dict:
    """torchvision keyword arguments that give it our Faster R-CNN's proposal counts and RoI sampling."""
    m = DEFAULTS["model"]
    return dict(rpn_pre_nms_top_n_train=m["rpn_pre_nms_train"], rpn_pre_nms_top_n_test=m["rpn_pre_nms_test"],
                rpn_post_nms_top_n_train=m["rpn_post_nms_train"] or RPN_POST_NMS_TRAIN["faster"],
                rpn_post_nms_top_n_test=m["rpn_post_nms_test"], rpn_batch_size_per_image=m["rpn_batch_per_image"],
                box_batch_size_per_image=m["roi_batch_per_image"], box_detections_per_img=m["detections_per_image"],
                box_score_thresh=m["score_thresh"], box_nms_thresh=m["nms_thresh"])


def torchvision_model(size: int = 640) -> torch.nn.Module:
    from timm.layers import freeze_batch_norm_2d
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1,
                                    min_size=size, max_size=max(size, int(size * 1066 / 640)),
                                    **equal_work())   # all layers trainable without weights
    model.backbone.body = freeze_batch_norm_2d(model.backbone.body)   # FrozenBN, as in its pretrained setting
    return model


def demo_batch(batch: int, device, size: int = 640):
    from distill.core.demo_data import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, num_classes=8, train_per_class=1, val_per_class=1, image_size=size, seed=0)
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


def report(rows, coco, device, batch, iters, size=640) -> str:
    w = equal_work()
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    lines = [f"Device: {machine_line(device)}; batch {batch} at {size} px "
             f"(demo scenes, {size}x{size}); mean {clock} of {iters} alternating iterations after warm-up.",
             f"Equal work: every Faster R-CNN row, torchvision's included, keeps {w['rpn_pre_nms_top_n_train']} "
             f"pre-NMS proposals per level and {w['rpn_post_nms_top_n_train']} post-NMS per image in training "
             f"({w['rpn_pre_nms_top_n_test']} / {w['rpn_post_nms_top_n_test']} at test) and samples "
             f"{w['box_batch_size_per_image']} RoIs per image; Cascade keeps {RPN_POST_NMS_TRAIN['cascade']} "
             "post-NMS in training (detectron2's Cascade config).", "",
             "| model | train s/iter | train img/s | eval img/s |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['train_s_iter']:.3f} | {r['train_img_s']:.2f} | {r['eval_img_s']:.2f} |")
    lines.append("")
    for name in rows:
        before = rows.get(name.replace(OURS, PREVIOUS))
        if name.endswith(OURS) and before:
            lines.append(f"- {name.replace(' ' + OURS, '')}: train {before['train_s_iter'] / rows[name]['train_s_iter']:.2f}x, "
                         f"eval {rows[name]['eval_img_s'] / before['eval_img_s']:.2f}x the previous path")
    for name in rows:
        ours = rows.get(name.replace(DETECTRON2, OURS))
        if name.endswith(DETECTRON2) and ours:
            lines.append(f"- {name.replace(' ' + DETECTRON2, '')}: ours vs the detectron2 engine: train "
                         f"{rows[name]['train_s_iter'] / ours['train_s_iter']:.2f}x, eval "
                         f"{ours['eval_img_s'] / rows[name]['eval_img_s']:.2f}x")
    tv = rows.get("torchvision fasterrcnn_resnet50_fpn (equal work)")
    ours = rows.get(f"faster R-CNN r50_vd-FPN {OURS}")
    if tv and ours:
        lines.append(f"- faster R-CNN r50_vd-FPN vs torchvision R50-FPN at equal work: train "
                     f"{tv['train_s_iter'] / ours['train_s_iter']:.2f}x, eval {ours['eval_img_s'] / tv['eval_img_s']:.2f}x "
                     "(r50_vd is ResNet-50-D: a deep stem and avg-pool shortcuts, a little more work than R50)")
    if coco:
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
    parser.add_argument("--size", type=int, default=640, help="shorter image side")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--archs", nargs="+", default=["faster", "cascade"], choices=["faster", "cascade"])
    parser.add_argument("--no-previous", action="store_true", help="skip our previous-path rows")
    parser.add_argument("--no-torchvision", action="store_true", help="skip the torchvision row")
    parser.add_argument("--no-detectron2", action="store_true", help="skip the detectron2 rows (shown when installed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--coco-images", type=int, default=1000, help="images in the COCO-eval timing (0: skip)")
    parser.add_argument("--out", help="also write the markdown report here")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images, targets = demo_batch(args.batch, device, args.size)
    makers = {}
    for bb in args.backbones:
        for arch in args.archs:
            makers[f"{arch} R-CNN {bb}-FPN {OURS}"] = lambda a=arch, b=bb: our_model(a, b, args.size)
            if not args.no_previous:
                makers[f"{arch} R-CNN {bb}-FPN {PREVIOUS}"] = \
                    lambda a=arch, b=bb: previous_path(our_model(a, b, args.size))
            if not args.no_detectron2 and importlib.util.find_spec("detectron2"):
                makers[f"{arch} R-CNN {bb}-FPN {DETECTRON2}"] = \
                    lambda a=arch, b=bb: detectron2_model(a, b, args.device, args.size)
    if not args.no_torchvision:
        makers["torchvision fasterrcnn_resnet50_fpn (equal work)"] = lambda: torchvision_model(args.size)
    rows = bench_models(makers, images, targets, device, args.iters, args.warmup)
    for name, r in rows.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    coco = bench_coco_eval(args.coco_images) if args.coco_images else None
    text = report(rows, coco, device, args.batch, args.iters, args.size)
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Detection benchmarks\n\n" + text + "\n")
    if args.json:
        import json
        Path(args.json).write_text(json.dumps(dict(rows=rows, coco=coco, machine=machine_line(device)), indent=2))
    return text


if __name__ == "__main__":
    run_cli(main)
