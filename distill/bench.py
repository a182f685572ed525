"""Distillation-step throughput: the trainer's step next to the plain loop a newcomer writes, in one run.

    python -m distill.bench --teacher timm:resnet50d --student mv3_large --batch 128 --size 224

Both loops read the same images through the same DataLoader (demo images are generated when --data is
not given) and run the same ssld loss and SGD. The plain loop is fp32, NCHW, a separate teacher forward
under no_grad, no compile; ours is `distill.ssld.distill_step` with the chosen autocast dtype,
channels_last and optional torch.compile. Prints img/s for each, the ratio, and the share of each loop's
time spent waiting for data.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from distill.students import zoo
from distill.students.artifact import IMAGENET_MEAN, IMAGENET_STD
from distill.data import TrainStream, folder_source
from distill.core.images import build_transform, collate_skipping, normalize_on_device
from distill.core.benchmark import machine_line, synchronize
from distill.core.errors import UserError, run_cli
from distill.losses import DistillLoss, ssld_loss
from distill.core.precision import Precision
from distill.ssld import distill_step
from distill.teacher import Teacher


def make_loader(data_dir, batch, size, workers, device, output="float"):
    source = folder_source(data_dir)
    transform = build_transform("random_crop", size, IMAGENET_MEAN, IMAGENET_STD, output=output)
    stream = TrainStream([source], transform, batch, epoch_samples=max(source.size, batch), seed=0)
    return stream, DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=collate_skipping,
                              pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


def batches_forever(stream, loader):
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        yield from loader
        epoch += 1


class TimedLoop:
    """A training step plus its batch iterator; `run(n)` adds n timed iterations to the totals."""

    def __init__(self, step, batches, device):
        self.step, self.batches, self.device = step, batches, device
        self.seconds = self.wait = 0.0
        self.images = 0

    def run(self, n: int, timed: bool = True) -> None:
        synchronize(self.device)
        start, wait, images = time.perf_counter(), 0.0, 0
        for _ in range(n):
            t0 = time.perf_counter()
            batch_images, labels, _ = next(self.batches)
            wait += time.perf_counter() - t0
            self.step(batch_images, labels)
            images += len(batch_images)
        synchronize(self.device)
        if timed:
            self.seconds += time.perf_counter() - start
            self.wait += wait
            self.images += images

    def result(self) -> dict:
        return dict(img_per_s=self.images / self.seconds, seconds=self.seconds, images=self.images,
                    data_wait_share=self.wait / self.seconds)


def plain_loop(student, teacher_model, device, lr=0.1):
    """What a newcomer writes: fp32, NCHW, teacher under no_grad, blocking copies."""
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    def step(images, labels):
        images = images.to(device)
        with torch.no_grad():
            q = F.softmax(teacher_model(images), dim=1)
        loss = ssld_loss(student(images), q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def kit_loop(student, teacher, device, amp, channels_last, lr=0.1):
    """The trainer's step (distill.ssld.distill_step) with its speed settings; uint8 batches are
    normalised on the device, as the trainer does."""
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    precision = Precision(amp or "off", device)
    criterion = DistillLoss("ssld")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def step(images, labels):
        images = normalize_on_device(images.to(device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)
        images = images.contiguous(memory_format=memory_format)
        distill_step(student, teacher, criterion, images, labels.to(device, non_blocking=True), opt, precision)
    return step


def build_pair(teacher_name, student_name, num_classes, device):
    torch.manual_seed(0)
    teacher = zoo.create_model(teacher_name, num_classes=num_classes).to(device)
    student = zoo.create_model(student_name, num_classes=num_classes).to(device).train()
    return teacher, student


def bench(teacher_name, student_name, data_dir, batch=64, size=224, steps=20, warmup=5, workers=4,
          amp="auto", channels_last=None, compile_model=False, device="auto", rounds: int = 4) -> dict:
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else None
    if channels_last is None:
        channels_last = device.type == "cuda"
    num_classes = len(folder_source(data_dir).classes)
    results = dict(machine=machine_line(device), device=str(device), teacher=teacher_name, student=student_name,
                   batch=batch, size=size, steps=steps, workers=workers,
                   kit_settings=dict(amp=amp, channels_last=channels_last, compile=compile_model))

    teacher_model, student = build_pair(teacher_name, student_name, num_classes, device)
    plain = TimedLoop(plain_loop(student, teacher_model, device),
                      batches_forever(*make_loader(data_dir, batch, size, workers, device)), device)

    teacher_model, student = build_pair(teacher_name, student_name, num_classes, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(memory_format=memory_format)
    teacher = Teacher([teacher_model], [{}], bn="train").to(device, memory_format)
    if compile_model:
        student = torch.compile(student)
        teacher.models = [torch.compile(m) for m in teacher.models]
    kit = TimedLoop(kit_loop(student, teacher, device, amp, channels_last),
                    batches_forever(*make_loader(data_dir, batch, size, workers, device, "uint8")), device)

    for loop in (plain, kit):
        loop.run(warmup, timed=False)
    for r in range(rounds):  # alternate, so drifting machine load hits both loops alike
        for loop in (plain, kit) if r % 2 == 0 else (kit, plain):
            loop.run(max(1, steps // rounds))
    results["plain"], results["ssld_kit"] = plain.result(), kit.result()
    results["speedup"] = results["ssld_kit"]["img_per_s"] / results["plain"]["img_per_s"]
    return results


def write_photo_jpegs(root, count: int, classes: int = 4, sides=(400, 500), seed: int = 0) -> Path:
    """ImageNet-like JPEGs in an ImageFolder: 400-500 px, quality 90, smooth colour fields plus grain,
    which decode and resample like photographs (flat demo shapes decode unrealistically fast)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for i in range(count):
        w, h = (int(rng.integers(sides[0], sides[1] + 1)) for _ in range(2))
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def loader_bench(data_dir, size: int = 224, batch: int = 64, rounds: int = 4, workers: int = 0) -> dict:
    """Training input pipelines side by side: torchvision ImageFolder + PIL + transforms against ours
    (TrainStream, crop-aware JPEG decoding, uint8 out). One torch thread, alternating rounds, one epoch
    each; with workers the img/s is divided by the worker count (images per second per core)."""
    from torchvision import datasets
    from torchvision import transforms as T

    torch.set_num_threads(1)
    reference = datasets.ImageFolder(str(data_dir), transform=T.Compose([
        T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    generator = torch.Generator().manual_seed(0)
    pipelines = {
        "torchvision ImageFolder + PIL + transforms (float)": DataLoader(
            reference, batch_size=batch, shuffle=True, num_workers=workers, generator=generator),
        "ssld-kit TrainStream, uint8 (normalised on the device)": make_loader(
            data_dir, batch, size, workers, torch.device("cpu"), "uint8"),
        "ssld-kit TrainStream, float (normalised in the loader)": make_loader(
            data_dir, batch, size, workers, torch.device("cpu"), "float"),
    }
    totals = {name: [0, 0.0] for name in pipelines}
    # In-process (no workers) the CPU time of this process is the work done, whatever else runs on the
    # machine; with workers the wall clock is all there is (the workers' CPU time is not reported back).
    clock = time.process_time if workers == 0 else time.perf_counter

    def one_epoch(name, r):
        loader = pipelines[name]
        if isinstance(loader, tuple):
            stream, loader = loader
            stream.set_epoch(r)
        t0, n = clock(), 0
        for images, *_ in loader:
            n += len(images)
        totals[name][0] += n
        totals[name][1] += clock() - t0

    names = list(pipelines)
    for name in names:              # warm-up: file cache, worker start-up
        one_epoch(name, 0)
    totals = {name: [0, 0.0] for name in pipelines}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            one_epoch(name, r + 1)
    cores = max(1, workers)
    rows = {name: dict(img_per_s=n / s, img_per_s_per_core=n / s / cores, images=n, seconds=s)
            for name, (n, s) in totals.items()}
    base = rows[names[0]]["img_per_s"]
    for row in rows.values():
        row["ratio"] = row["img_per_s"] / base
    return dict(machine=machine_line("cpu"), size=size, batch=batch, rounds=rounds, workers=workers,
                images=len(reference), rows=rows, clock="process CPU time" if workers == 0 else "wall clock")


def format_loader(r: dict) -> str:
    width = max(map(len, r["rows"]))
    lines = [f"machine: {r['machine']}",
             f"training input pipeline: {r['images']} JPEGs, random-resized crop to {r['size']} px + flip, "
             f"batch {r['batch']}, {max(1, r['workers'])} core(s) ({r['workers']} workers), "
             f"{r['rounds']} alternating epochs each, timed by {r['clock']}",
             f"{'pipeline':<{width}}  {'img/s/core':>10}  {'ratio':>6}"]
    lines += [f"{name:<{width}}  {x['img_per_s_per_core']:>10.1f}  {x['ratio']:>5.2f}x" for name, x in r["rows"].items()]
    return "\n".join(lines)


def format_results(r: dict) -> str:
    k = r["kit_settings"]
    kit = f"ssld-kit (amp {k['amp']}, channels_last {k['channels_last']}, compile {k['compile']})"
    rows = [("plain (fp32, NCHW, no compile)", r["plain"]), (kit, r["ssld_kit"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"machine: {r['machine']}",
             f"teacher {r['teacher']} -> student {r['student']}, batch {r['batch']}, {r['size']} px, "
             f"{r['steps']} timed steps each, {r['workers']} workers",
             f"{'loop':<{width}}  {'img/s':>9}  {'data wait':>9}"]
    lines += [f"{name:<{width}}  {x['img_per_s']:>9.1f}  {100 * x['data_wait_share']:>8.1f}%" for name, x in rows]
    lines.append(f"speedup: {r['speedup']:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill.bench", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="r50_vd", help="zoo name or timm:ARCH (random weights: speed only)")
    p.add_argument("--student", default="mv3_large")
    p.add_argument("--data", help="ImageFolder to read (default: generate demo images in a temp folder)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default 4; --loader: 0, timed by this process's CPU time)")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast dtype of our loop (auto: bf16 on GPU, none on CPU)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher in our loop")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--loader", action="store_true",
                   help="benchmark the training input pipeline against torchvision's instead of the step")
    p.add_argument("--images", type=int, default=300, help="--loader: how many 400-500 px JPEGs to generate")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (--loader: epochs per pipeline)")
    args = p.parse_args(argv)
    if args.loader:
        return main_loader(args)
    args.workers = 4 if args.workers is None else args.workers
    for name in (args.teacher, args.student):
        zoo.get_entry(name)  # a zoo name or timm:ARCH, else a message with suggestions
    amp = None if args.amp == "none" else args.amp
    with contextlib.ExitStack() as stack:
        data = args.data
        if data is None:
            from distill.core.demo_data import generate
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ssld_bench_"))
            generate(tmp, num_classes=8, train_per_class=max(8, args.batch // 4), val_per_class=1,
                     image_size=max(64, min(args.size, 256)))
            data = str(Path(tmp) / "train")
        elif not Path(data).is_dir():
            raise UserError(f"--data {data}: not a folder")
        r = bench(args.teacher, args.student, data, args.batch, args.size, args.steps, args.warmup, args.workers,
                  amp, args.channels_last, args.compile, args.device)
    print(format_results(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


def main_loader(args) -> dict:
    with contextlib.ExitStack() as stack:
        data = args.data
        if data is None:
            data = stack.enter_context(tempfile.TemporaryDirectory(prefix="ssld_loader_bench_"))
            write_photo_jpegs(data, args.images)
        elif not Path(data).is_dir():
            raise UserError(f"--data {data}: not a folder")
        r = loader_bench(data, args.size, args.batch, args.rounds, max(0, args.workers or 0))
    print(format_loader(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    run_cli(main)
