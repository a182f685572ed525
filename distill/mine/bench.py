"""python -m distill.mine bench: peak RSS and throughput for pools 10x apart, each in a fresh process;
then the teacher pass alone (mining's, and the distillation step's teacher forward) beside the plain
`torch.no_grad()` loop a newcomer writes, over the same in-memory batches, alternating rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from distill.core.errors import UserError
from .mining import stem_path

def write_bench_pool(root: Path, size: int, image_size: int, per_shard: int = 1000, seed: int = 0):
    """`size` tiny random-colour JPEGs in WebDataset shards of `per_shard`, plus a list-file pool of the
    same length that cycles over 1000 image files (its path index grows with the pool, its pixels don't)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "files").mkdir(parents=True, exist_ok=True)
    base = []
    for i in range(1000):
        pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        im = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        base.append(buf.getvalue())
        (root / "files" / f"{i:04d}.jpg").write_bytes(base[-1])
    with wds.ShardWriter(str(root / "shard-%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(size):
            sink.write({"__key__": f"{i:08d}", "jpg": base[(i * 7919) % 1000]})
    (root / "pool_list.txt").write_text("".join(f"files/{(i * 7919) % 1000:04d}.jpg\n" for i in range(size)))
    return size // per_shard


def teacher_pass_bench(teacher: str, classes: int, image_files, input_size: int, batch_size: int,
                       device: str = "auto", rounds: int = 4, amp: str = "auto") -> dict:
    """img/s of the plain loop (fp32, NCHW, no_grad) and of distill.teacher.Teacher as mining runs it
    (inference mode, channels_last on CUDA, bf16 autocast where the device has it) on the same batches."""
    import copy

    import torch
    import torch.nn.functional as F

    from distill.core.images import ListDataset, build_transform, collate_skipping
    from distill.core.precision import AMP_DTYPES, autocast
    from distill.teacher import Teacher, load_teacher_model
    from .mining import teacher_amp

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    amp = teacher_amp(amp, dev)
    torch.manual_seed(0)
    model, meta = load_teacher_model(teacher, classes)
    prep = meta.get("preprocessing", {})
    mean, std = prep.get("mean", (0.485, 0.456, 0.406)), prep.get("std", (0.229, 0.224, 0.225))
    plain = copy.deepcopy(model).to(dev).eval()
    ours = Teacher([model], [meta], bn="eval", student_mean=mean, student_std=std).to(dev)   # as mining builds it
    transform = build_transform("test", input_size, mean, std)
    data = ListDataset([(str(f), 0) for f in image_files], transform)
    batches = [collate_skipping([data[j] for j in range(i, min(i + batch_size, len(data)))])[0]
               for i in range(0, len(data), batch_size)]
    if dev.type == "cuda":
        batches = [b.pin_memory() for b in batches]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run_plain():
        out = None
        for x in batches:
            with torch.no_grad():
                out = F.softmax(plain(x.to(dev)), dim=1)
        return out

    def run_ours():
        out = None
        for x in batches:
            with autocast(dev.type, AMP_DTYPES[amp]):
                out = ours(x.to(dev, non_blocking=True))
        return out

    loops = {"plain torch.no_grad() loop (fp32, NCHW)": run_plain,
             f"ssld-kit teacher pass (inference mode, amp {amp}, "
             f"{'channels_last' if ours.memory_format == torch.channels_last else 'NCHW'})": run_ours}
    seconds = dict.fromkeys(loops, 0.0)
    with torch.no_grad():
        agree = float((run_plain().float() - run_ours().float()).abs().max())   # warm-up, and same outputs
    for r in range(rounds):
        for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
            sync()
            t0 = time.perf_counter()
            loops[name]()
            sync()
            seconds[name] += time.perf_counter() - t0
    n = rounds * len(data)
    rows = {name: n / s for name, s in seconds.items()}
    first = next(iter(rows.values()))
    return dict(device=str(dev), teacher=teacher, input_size=input_size, batch_size=batch_size, images=len(data),
                rounds=rounds, img_per_s=rows, speedup=list(rows.values())[1] / first, max_prob_diff=agree)


def format_teacher_pass(r: dict) -> str:
    width = max(map(len, r["img_per_s"]))
    lines = [f"teacher pass: {r['teacher']} at {r['input_size']} px, batch {r['batch_size']}, {r['images']} images "
             f"on {r['device']}, {r['rounds']} alternating rounds", f"{'loop':<{width}}  {'img/s':>9}"]
    lines += [f"{name:<{width}}  {v:>9.1f}" for name, v in r["img_per_s"].items()]
    lines.append(f"speedup: {r['speedup']:.2f}x (largest probability difference {r['max_prob_diff']:.1e})")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m distill.mine bench",
                                     description="peak RSS and images/s of mining for pools 10x apart")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--kinds", nargs="+", default=["wds", "list"], choices=["wds", "list"])
    parser.add_argument("--teacher", default="timm:test_resnet")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--part", default="all", choices=["all", "memory", "teacher"],
                        help="memory: the RSS runs; teacher: the teacher pass beside the plain loop")
    parser.add_argument("--pass-teacher", default="timm:resnet50d",
                        help="teacher of the teacher-pass part (random weights: speed only)")
    parser.add_argument("--pass-images", type=int, default=256)
    parser.add_argument("--pass-size", type=int, default=224, help="teacher-pass input size")
    parser.add_argument("--pass-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="auto", help="teacher-pass device: auto | cpu | cuda")
    parser.add_argument("--json", help="also write all results to this JSON file")
    args = parser.parse_args(argv)
    per_shard = 1000
    if any(s % per_shard for s in args.sizes):
        raise UserError(f"bench sizes must be multiples of {per_shard}, got {args.sizes}")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mine_bench_"))
    try:
        t = time.perf_counter()
        pool_size = max(args.sizes) if args.part != "teacher" else per_shard
        write_bench_pool(work, pool_size, args.image_size, per_shard)
        print(f"bench pool: {pool_size} images of {args.image_size} px in {work} "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        rows = []
        for kind in (args.kinds if args.part in ("all", "memory") else []):
            for size in sorted(args.sizes):
                if kind == "wds":
                    pool = str(work / f"shard-{{00000..{size // per_shard - 1:05d}}}.tar")
                else:
                    pool = str(work / f"pool_list_{size}.txt")
                    lines = (work / "pool_list.txt").read_text().splitlines(keepends=True)[:size]
                    Path(pool).write_text("".join(lines))
                out = work / f"mined_{kind}_{size}.txt"
                cmd = [sys.executable, "-m", "distill.mine", "--teacher", args.teacher, "--num-classes",
                       str(args.classes), "--pool", pool, "--k", str(args.k), "-o", str(out), "--input-size",
                       str(args.input_size), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                       "--shard-size", str(args.shard_size), "--device", "cpu", "--no-progress", "--fresh"]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
                if proc.returncode != 0:
                    raise UserError(f"bench run failed ({' '.join(cmd)}): {proc.stderr.strip()[-2000:]}")
                s = json.loads(stem_path(out, "_summary.json").read_text())
                rows.append(dict(kind=kind, pool=size, classes=args.classes, k=args.k,
                                 peak_rss_mb=s["peak_rss_mb"], images_per_s=s["images_per_s"],
                                 matrix_mb=round(size * args.classes * 4 / 2**20, 1)))
                print(f"  {kind} {size}: peak RSS {s['peak_rss_mb']:.0f} MB, {s['images_per_s']:.0f} img/s",
                      file=sys.stderr)
        passes = None
        if args.part in ("all", "teacher"):
            files = sorted((work / "files").glob("*.jpg"))[:args.pass_images]
            passes = teacher_pass_bench(args.pass_teacher, args.classes, files, args.pass_size, args.pass_batch,
                                        args.device, args.rounds)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if passes is not None:
        print(format_teacher_pass(passes))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(memory=rows, teacher_pass=passes), indent=2))
    if not rows:
        return dict(memory=rows, teacher_pass=passes)
    print("| pool | images | classes x k | peak RSS (MB) | images/s | a pool x classes float32 matrix (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['pool']:,} | {r['classes']} x {r['k']} | {r['peak_rss_mb']:.0f} | "
              f"{r['images_per_s']:.0f} | {r['matrix_mb']:.0f} |")
    return rows


