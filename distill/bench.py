"""Distillation-step throughput: the trainer's step next to the plain loop a newcomer writes, in one run.

    python -m distill.bench --teacher timm:resnet50d --student mv3_large --batch 128 --size 224

Both loops read the same images through the same DataLoader (demo images are generated when --data is
not given) and run the same ssld loss and SGD. The plain loop is fp32, NCHW, a separate teacher forward
under no_grad, no compile; ours is `distill.ssld.distill_step` with the chosen autocast dtype,
channels_last and optional torch.compile. Prints img/s for each, the ratio, and the share of each loop's
time spent waiting for data.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from distill import ssld
from distill.students import zoo
from distill.students.artifact import IMAGENET_MEAN, IMAGENET_STD
from distill.data import TrainStream, build_sources, folder_source, stream_loader
from distill.core.config import Config, merge
from distill.core.distributed import DistInfo
from distill.core.images import build_transform, collate_skipping, normalize_on_device
from distill.core.benchmark import machine_line, synchronize
from distill.core.errors import ArgumentParser, UserError, run_cli
from distill.label_cache import build_cached_stream, dense_targets
from distill.losses import DistillLoss, ssld_loss
from distill.core.precision import Precision
from distill.relabel import write_labels
from distill.ssld import distill_step
from distill.teacher import Teacher, build_teacher


def make_loader(data_dir, batch, size, workers, device, output="float"):
    source = folder_source(data_dir)
    transform = build_transform("random_crop", size, IMAGENET_MEAN, IMAGENET_STD, output=output)
    stream = TrainStream([source], transform, batch, epoch_samples=max(source.size, batch), seed=0)
    return stream, stream_loader(stream, workers, device, collate_skipping)


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
            *batch, _ = next(self.batches)      # (images, labels[, cached top-k...], skipped)
            wait += time.perf_counter() - t0
            self.step(*batch)
            images += len(batch[0])
        synchronize(self.device)
        if timed:
            self.seconds += time.perf_counter() - start
            self.wait += wait
            self.images += images

    def result(self) -> dict:
        return dict(img_per_s=self.images / self.seconds, seconds=self.seconds, images=self.images,
                    data_wait_share=self.wait / self.seconds)


def batches_cycling(stream, loader, epochs: int):
    """Batches of epochs 0..epochs-1, over and over (a label cache holds that many)."""
    epoch = 0
    while True:
        stream.set_epoch(epoch % epochs)
        yield from loader
        epoch += 1


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


def step_settings(device: str, amp, channels_last):
    """(device, amp, channels_last) for the timed step: "auto" is CUDA when present, bf16 and channels_last
    on CUDA only (the student trains under run.amp, which a user sets: on the CPU that is off)."""
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else None
    return device, amp, device.type == "cuda" if channels_last is None else channels_last


def build_pair(teacher_name, student_name, num_classes, device):
    torch.manual_seed(0)
    teacher = zoo.create_model(teacher_name, num_classes=num_classes).to(device)
    student = zoo.create_model(student_name, num_classes=num_classes).to(device).train()
    return teacher, student


def bench(teacher_name, student_name, data_dir, batch=64, size=224, steps=20, warmup=5, workers=4,
          amp="auto", channels_last=None, compile_model=False, device="auto", rounds: int = 4) -> dict:
    device, amp, channels_last = step_settings(device, amp, channels_last)
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


# ---------------------------------------------------------------------------------------------------
# --cache: the student's step with the online teacher next to the same step from cached labels.

CACHE_PAIR = ("timm:resnet101d", "timm:resnet26d")   # teacher forward ~3.1x the student's (FLOPs, any size)


def forward_flops(name: str, size: int, num_classes: int) -> float:
    """FLOPs of one image's forward pass (torch's flop counter: matmuls and convolutions, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = zoo.create_model(name, num_classes=num_classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def cache_recipe(teacher: str, student: str, data_dir, batch: int, size: int, epochs: int, workers: int,
                 device, amp, channels_last: bool):
    """The distill.ssld recipe both loops share: one folder source, the teacher in BatchNorm train mode."""
    folder = dict(type="folder", path=str(data_dir))
    cfg = merge(ssld.DEFAULTS, dict(
        run=dict(device=device.type, amp=amp or "off", channels_last=channels_last, workers=workers, progress=False),
        student=dict(arch=student), teacher=dict(models=[teacher], bn="train"), loss=dict(kind="ssld"),
        data=dict(train=[folder], val=folder, batch_size=batch, input_size=size), schedule=dict(epochs=epochs)))
    return ssld.check(Config.wrap(cfg))


def cache_bench(teacher_name, student_name, data_dir, cache_dir, batch=64, size=224, steps=20, warmup=3, workers=4,
                amp="auto", channels_last=None, device="auto", rounds: int = 4, epochs: int = 2, k: int = 10) -> dict:
    """Write the labels once (timed), then alternate rounds of the online-teacher step and the cached step:
    the same student (same init), data, batch, precision and loss; only the teacher forward is replaced by
    the stored top-k."""
    device, amp, channels_last = step_settings(device, amp, channels_last)
    dist = DistInfo(0, 1, 0, device)
    cfg = cache_recipe(teacher_name, student_name, data_dir, batch, size, epochs, workers, device, amp, channels_last)
    sources = build_sources(cfg.data.train, None)
    num_classes = len(sources[0].classes)
    flops = dict(teacher=forward_flops(teacher_name, size, num_classes),
                 student=forward_flops(student_name, size, num_classes))

    t0 = time.perf_counter()
    manifest = write_labels(cfg, cache_dir, epochs, dist, k=k, progress=False)
    synchronize(device)
    write_seconds = time.perf_counter() - t0
    counts = manifest["counts"]

    precision = Precision(amp or "off", device)
    criterion = DistillLoss("ssld")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def student_step(step_teacher):
        torch.manual_seed(0)
        student = zoo.create_model(student_name, num_classes=num_classes).to(device, memory_format=memory_format)
        opt = torch.optim.SGD(student.train().parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step(images, labels, *cached):
            images = normalize_on_device(images.to(device, non_blocking=True), cfg.data.mean, cfg.data.std)
            images = images.contiguous(memory_format=memory_format)
            teacher = step_teacher
            if cached:   # the stored top-k stands in for the teacher's forward pass
                targets = dense_targets(cached[0].to(device, non_blocking=True),
                                        cached[1].to(device, non_blocking=True), num_classes)
                teacher = lambda _images, _temperature: targets   # noqa: E731
            distill_step(student, teacher, criterion, images, labels.to(device, non_blocking=True), opt, precision)
        return step

    torch.manual_seed(0)
    teacher = build_teacher(cfg.teacher, num_classes, cfg.data.mean, cfg.data.std).to(device)
    online_stream, online_loader = ssld.build_train_loader(cfg, sources, dist)
    cached_stream, cached_loader, _ = build_cached_stream(cfg, cache_dir, sources, dist, num_classes)
    loops = dict(online=TimedLoop(student_step(teacher), batches_cycling(online_stream, online_loader, epochs), device),
                 cached=TimedLoop(student_step(None), batches_cycling(cached_stream, cached_loader, epochs), device))
    for loop in loops.values():
        loop.run(warmup, timed=False)
    for r in range(rounds):  # alternate, so drifting machine load hits both loops alike
        for name in (("online", "cached") if r % 2 == 0 else ("cached", "online")):
            loops[name].run(max(1, steps // rounds))
    results = dict(machine=machine_line(device), device=str(device), teacher=teacher_name, student=student_name,
                   batch=batch, size=size, steps=steps, rounds=rounds, workers=workers, amp=amp,
                   channels_last=channels_last, bn=cfg.teacher.bn, k=manifest["k"], epochs=epochs,
                   flops=dict(flops, ratio=flops["teacher"] / flops["student"]),
                   online=loops["online"].result(), cached=loops["cached"].result())
    for name in ("online", "cached"):
        results[name]["ms_per_step"] = 1000 * results[name]["seconds"] / (results[name]["images"] / batch)
    results["speedup"] = results["cached"]["img_per_s"] / results["online"]["img_per_s"]
    images = manifest["positions_per_epoch"] * epochs
    run = manifest["last_run"]
    results["write"] = dict(seconds=write_seconds, image_epochs=images, img_per_s=run["crops"] / run["seconds"],
                            setup_seconds=write_seconds - run["seconds"], bytes=counts["bytes"],
                            bytes_per_image_epoch=counts["bytes"] / counts["records"],
                            record_bytes=manifest["record_bytes"])
    return results


def format_cache(r: dict) -> str:
    f, w = r["flops"], r["write"]
    rows = [("student step, online teacher", r["online"]), ("student step, cached labels", r["cached"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"machine: {r['machine']}",
             f"teacher {r['teacher']} ({f['teacher'] / 1e9:.2f} GFLOP/img) -> student {r['student']} "
             f"({f['student'] / 1e9:.2f} GFLOP/img): teacher forward {f['ratio']:.2f}x the student's; batch "
             f"{r['batch']}, {r['size']} px, amp {r['amp']}, channels_last {r['channels_last']}, teacher bn "
             f"{r['bn']}, {r['workers']} workers, {r['steps']} timed steps each in {r['rounds']} alternating rounds",
             f"{'loop':<{width}}  {'img/s':>9}  {'ms/step':>9}  {'data wait':>9}"]
    lines += [f"{name:<{width}}  {x['img_per_s']:>9.1f}  {x['ms_per_step']:>9.1f}  {100 * x['data_wait_share']:>8.1f}%"
              for name, x in rows]
    lines.append(f"cached / online step throughput: {r['speedup']:.2f}x")
    lines.append(f"writing the labels (once): {w['image_epochs']} image-epochs ({r['epochs']} epochs) in "
                 f"{w['seconds']:.1f} s: {w['img_per_s']:.1f} img/s (decode, crop, teacher, top-k, write) after "
                 f"{w['setup_seconds']:.1f} s of setup (teacher build and hash, sources)")
    lines.append(f"storage: {w['bytes_per_image_epoch']:.1f} bytes per image-epoch on disk at this shard size "
                 f"({w['record_bytes']} bytes of record at k={r['k']}); 5M images x 360 epochs: "
                 f"{5e6 * 360 * w['record_bytes'] / 1e9:.0f} GB")
    return "\n".join(lines)


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
    p = ArgumentParser(prog="python -m distill.bench", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="zoo name or timm:ARCH, random weights: speed only (default r50_vd; "
                   f"--cache: {CACHE_PAIR[0]})")
    p.add_argument("--student", help=f"(default mv3_large; --cache: {CACHE_PAIR[1]})")
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
    p.add_argument("--cache", action="store_true", help="the student's step with the online teacher against the "
                   "same step from cached labels (distill.relabel), the labels' write cost and size")
    p.add_argument("--epochs", type=int, default=2, help="--cache: epochs of labels to write")
    p.add_argument("--k", type=int, default=10, help="--cache: classes kept per crop")
    args = p.parse_args(argv)
    if args.loader:
        return main_loader(args)
    args.workers = 4 if args.workers is None else args.workers
    teacher, student = CACHE_PAIR if args.cache else ("r50_vd", "mv3_large")
    args.teacher, args.student = args.teacher or teacher, args.student or student
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
        if args.cache:
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="ssld_bench_labels_"))
            r = cache_bench(args.teacher, args.student, data, cache, args.batch, args.size, args.steps, args.warmup,
                            args.workers, amp, args.channels_last, args.device, args.rounds, args.epochs, args.k)
        else:
            r = bench(args.teacher, args.student, data, args.batch, args.size, args.steps, args.warmup, args.workers,
                      amp, args.channels_last, args.compile, args.device)
    print(format_cache(r) if args.cache else format_results(r))
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
