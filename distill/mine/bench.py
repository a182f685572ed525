"""python -m distill.mine bench: peak RSS and throughput for pools 10x apart, each in a fresh process.
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
    args = parser.parse_args(argv)
    per_shard = 1000
    if any(s % per_shard for s in args.sizes):
        raise UserError(f"bench sizes must be multiples of {per_shard}, got {args.sizes}")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mine_bench_"))
    try:
        t = time.perf_counter()
        write_bench_pool(work, max(args.sizes), args.image_size, per_shard)
        print(f"bench pool: {max(args.sizes)} images of {args.image_size} px in {work} "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        rows = []
        for kind in args.kinds:
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
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print("| pool | images | classes x k | peak RSS (MB) | images/s | a pool x classes float32 matrix (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['pool']:,} | {r['classes']} x {r['k']} | {r['peak_rss_mb']:.0f} | "
              f"{r['images_per_s']:.0f} | {r['matrix_mb']:.0f} |")
    return rows


