"""Fine-tuning throughput (images/s): our loop against a torchvision-reference-style loop, in one run.

    python -m transfer.bench --backbone timm:resnet18d --image-size 64 --batch-size 32
    python -m transfer.bench --backbone r50_vd_ssld --image-size 224 --batch-size 64 --amp bf16 --channels-last

Both loops train the same model (same initial weights) on the same in-memory batches, so the figure
is the training step: ours (the engine's loop, distill.core.engine.Engine.train_epoch, over
transfer.finetune's step: per-stage parameter groups, per-iteration schedule, mixup/label-smoothing aware
loss, skipped-image bookkeeping, the non-finite guard) against the plain loop of
torchvision's references/classification/train.py (one parameter group, CrossEntropyLoss, zero_grad /
backward / step). Rounds alternate between the two loops and the median is reported, which keeps a
machine shared with other work from favouring either side.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from distill.core.benchmark import machine_line, synchronize
from distill.core.config import Config
from distill.core.distributed import DistInfo
from distill.core.engine import Engine
from distill.core.errors import UserError, run_cli
from distill.students.artifact import load_student
from distill.core.precision import AMP_DTYPES, autocast
from distill.core.schedule import build_scheduler
from distill.core.trainer_kit import RUN_DEFAULTS

from . import config as tcfg
from . import finetune as ft


def reference_train_steps(model, batches, optimizer, criterion, device, amp) -> None:
    """torchvision references/classification/train.py, train_one_epoch, without logging."""
    model.train()
    for image, target in batches:
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device.type, amp):
            output = model(image)
            loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def measure(run_steps, n_images: int, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    run_steps()
    synchronize(device)
    return n_images / (time.perf_counter() - t0)


class InMemoryTask(ft.FinetuneTask):
    """transfer.finetune's step over batches already in memory (the figure is the step, not the loader)."""

    def __init__(self, model, optimizer, scheduler, batches, device, channels_last):
        self.model, self.optimizer, self.scheduler, self.list = model, optimizer, scheduler, batches
        self.device, self.channels_last, self.mixup, self.label_smoothing = device, channels_last, 0.0, 0.0
        self.epochs, self.steps_per_epoch, self.global_batch = 1, len(batches), len(batches[0][1])

    def batches(self, epoch, start):
        return self.list[start:]

    def train_mode(self, net):
        net.train()


def in_memory_engine(model, cfg, res, batches, device, amp_kind, channels_last, scratch) -> Engine:
    optimizer = torch.optim.SGD(ft.param_groups(model, cfg, res, "finetune", cfg.optim.lr), lr=cfg.optim.lr,
                                momentum=0.9, nesterov=True)
    scheduler = build_scheduler(optimizer, "cosine", total_steps=10 ** 9, warmup_steps=0)
    task = InMemoryTask(model, optimizer, scheduler, batches, device, channels_last)
    cfg = Config.wrap(dict(run=dict(RUN_DEFAULTS, out_dir=str(scratch), amp=amp_kind, channels_last=False,
                                    log_period=10 ** 9, checkpoint_minutes=0.0, progress=False)))
    return Engine(task, cfg, DistInfo(0, 1, 0, device), restart=True)


def bench(backbone: str, image_size: int, batch_size: int, steps: int, warmup: int, rounds: int,
          num_classes: int, device: str, amp_kind: str, channels_last: bool, lr_mult=None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        return _bench(backbone, image_size, batch_size, steps, warmup, rounds, num_classes, device, amp_kind,
                      channels_last, lr_mult, Path(scratch))


def _bench(backbone, image_size, batch_size, steps, warmup, rounds, num_classes, device, amp_kind, channels_last,
           lr_mult, scratch) -> dict:
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    torch.manual_seed(0)
    model, meta = load_student(backbone, num_classes=num_classes)
    cfg = tcfg.check(tcfg.load(tcfg.parse(["--dataset", "folder:bench", "--backbone", backbone])))
    res = ft.resolve_defaults(cfg, meta)
    if lr_mult is not None:
        res.lr_mult = lr_mult
    amp = AMP_DTYPES[amp_kind]
    if amp is torch.float16:
        raise UserError("--amp fp16 needs a gradient scaler in both loops; use bf16 to compare")
    batches = [(torch.randn(batch_size, 3, image_size, image_size), torch.randint(0, num_classes, (batch_size,)))
               for _ in range(steps)]
    if channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    n_images = steps * batch_size

    ours_model = copy.deepcopy(model).to(device)
    ref_model = copy.deepcopy(model).to(device)
    if channels_last:
        ours_model.to(memory_format=torch.channels_last)
        ref_model.to(memory_format=torch.channels_last)
    engine = in_memory_engine(ours_model, cfg, res, [(x, y, []) for x, y in batches], device, amp_kind,
                              channels_last, scratch)
    ours_opt = engine.task.optimizer
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=cfg.optim.lr, momentum=0.9, weight_decay=res.weight_decay)
    criterion = nn.CrossEntropyLoss()

    def ours():
        engine.state.batch = 0
        engine.train_epoch(0)

    def reference():
        reference_train_steps(ref_model, batches, ref_opt, criterion, device, amp)

    for _ in range(max(warmup, 0)):  # allocator, cudnn autotune, first-touch: not timed
        ours()
        reference()
    ours_ips, ref_ips = [], []
    for _ in range(rounds):
        ours_ips.append(measure(ours, n_images, device))
        ref_ips.append(measure(reference, n_images, device))
    ours_med, ref_med = statistics.median(ours_ips), statistics.median(ref_ips)
    return dict(backbone=backbone, arch=meta["arch"], image_size=image_size, batch_size=batch_size,
                steps_per_round=steps, rounds=rounds, device=str(device), amp=amp_kind, channels_last=channels_last,
                param_groups=len(ours_opt.param_groups), ours_img_s=round(ours_med, 1),
                reference_img_s=round(ref_med, 1), ratio=round(ours_med / ref_med, 3),
                ours_all=[round(v, 1) for v in ours_ips], reference_all=[round(v, 1) for v in ref_ips],
                machine=machine_line(device))


def markdown_row(r: dict) -> str:
    return (f"| {r['backbone']} | {r['image_size']} | {r['batch_size']} | {r['device']} | {r['amp']} | "
            f"{r['ours_img_s']:.1f} | {r['reference_img_s']:.1f} | {r['ratio']:.3f} | {r['machine']} |")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m transfer.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backbone", action="append", help="repeatable (default timm:resnet18d)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="training steps per timed round")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.steps, args.rounds, args.batch_size) < 1:
        raise UserError("--steps, --rounds and --batch-size must be at least 1")
    results = []
    print("| backbone | px | batch | device | amp | ours img/s | reference img/s | ours/ref | machine |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backbone in args.backbone or ["timm:resnet18d"]:
        r = bench(backbone, args.image_size, args.batch_size, args.steps, args.warmup, args.rounds,
                  args.num_classes, args.device, args.amp, args.channels_last)
        results.append(r)
        print(markdown_row(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_cli(main)
