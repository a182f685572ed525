"""Unlabeled-data mining for SSLD: the teacher's top-k images per class from a large pool, exact at any scale.

The SSLD data step (the paper mined 4M images out of ImageNet-22k): run the teacher over an unlabeled pool
and keep, for every class, the k images it gives the highest probability for that class. Memory grows with
classes x k, not with the pool: a running top-k per class absorbs one batch at a time, and no pool x classes
matrix ever exists. The pool is cut into shards (fixed-size chunks of a folder or list file, or one
WebDataset tar each). Under torchrun every rank mines every world_size-th shard; the order is total (score
descending, then pool order), so merging the ranks' top-k gives exactly the single-process list. After each
finished shard a rank saves its state atomically: an interrupted run, started again, skips those shards.

    python -m distill.mine --teacher T --pool POOL --k K -o mined.txt [--merge-with data/train_list.txt]
    python -m distill.mine dedup --teacher T --pool POOL --against VAL -o pool_kept.txt   (distill/dedup.py)
    python -m distill.mine bench                             (peak RSS and images/s for pools 10x apart)
    torchrun --nproc_per_node 8 -m distill.mine --teacher T --pool 'pool/{0000..0999}.tar' --k 4000 -o mined.txt

POOL: a folder of images (searched recursively), a list file (`relpath [label]` lines) or WebDataset shards
(`pool/shard-{000..099}.tar`, a glob, or one .tar). Output: `relpath class score` lines, class by class, best
first (paths relative to the list's folder), and OUT_summary.json with the per-class counts.

"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from distill.core.atomic import atomic_write, remove_stale_temporaries
from distill.core.checkpoint import load_checkpoint, save_checkpoint
from distill.data import UNLABELED, WDS_IMAGE_KEYS, folder_source, list_source
from distill.core.distributed import barrier, cleanup, init_distributed
from distill.core.errors import ArgumentParser, UserError, number_in
from distill.core.progress import Progress
from distill.core.precision import AMP_DTYPES, autocast
from distill.teacher import Teacher
from distill.core.distributed import gather_objects as gather
from .pool import WDS_ID_BITS, Pool, normalized_exclude, open_pool, read_exclude, relative_to, shard_loader
from .teacher import add_teacher_args, load_mining_teacher, teacher_amp
from .topk import TopKPerClass

ASSIGN_MODES = ("all", "top1")


# ---------------------------------------------------------------------------------------------------
# Mining one rank's shards, with resume.

def save_state(path, state: dict) -> None:
    """Atomic: a kill mid-write keeps the previous state (the shards finished before it)."""
    save_checkpoint(path, state)


def load_state(path, fingerprint: dict) -> dict | None:
    if not Path(path).is_file():
        return None
    state = load_checkpoint(path)
    saved = state.get("fingerprint", {})
    differs = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differs:
        raise UserError(f"{path} holds an interrupted run with other settings ({', '.join(differs)}: "
                        f"{', '.join(f'{saved.get(k)!r} -> {fingerprint.get(k)!r}' for k in differs)}); "
                        "delete it, pass --fresh, or rerun with the old settings to resume")
    return state


def mine_rank(pool: Pool, teacher: Teacher, transform, num_classes: int, *, k: int, assign: str,
              batch_size: int, workers: int, dist, state_path: Path, fingerprint: dict, fresh: bool = False,
              exclude=frozenset(), amp: str = "off", progress: bool = True) -> dict:
    """Mine this rank's shards, resuming from state_path; returns the rank's top-k, names and counts."""
    amp_dtype = AMP_DTYPES[teacher_amp(amp, dist.device)]
    topk = TopKPerClass(num_classes, k, dist.device)  # on the GPU when there is one: the sorts are per batch
    state = None if fresh else load_state(state_path, fingerprint)
    done, names, counts = [], {}, dict(images=0, skipped=0)
    if state is not None:
        topk.load_state_dict(state["topk"])
        done, names, counts = list(state["done"]), dict(state["names"]), dict(state["counts"])
    mine = pool.shards_of_rank(dist.rank, dist.world_size)
    finished = set(done)
    todo = [s for s in mine if s not in finished]
    if done and dist.is_main:
        print(f"mine: resuming from {state_path.parent}: {len(done)} of {len(mine)} shards of rank 0 done",
              file=sys.stderr)
    total = pool.size * len(todo) // max(pool.num_shards, 1) if pool.size else None  # this rank's share
    bar = Progress(total, "mine", enabled=progress and dist.is_main and bool(todo))
    computed, t0, images_now, warned = [], time.perf_counter(), 0, 0
    loader = shard_loader(pool, todo, transform, batch_size, workers, exclude, pin=dist.device.type == "cuda")
    for batch in loader:
        for s in batch["skipped"][:max(0, 5 - warned)]:
            print(f"warning: skipped unreadable image {s.reason}", file=sys.stderr)
        warned += len(batch["skipped"])
        counts["skipped"] += len(batch["skipped"])
        if len(batch["ids"]):
            with autocast(dist.device.type, amp_dtype):   # the teacher runs in inference mode itself
                probs = teacher(batch["images"].to(dist.device, non_blocking=True))
            topk.add_batch(probs, batch["ids"], top1_only=assign == "top1")
            counts["images"] += len(batch["ids"])
            images_now += len(batch["ids"])
            bar.update(len(batch["ids"]))
            if pool.kind == "wds":   # names of the images that entered the top-k (pruned at shard end)
                entered = torch.isin(batch["ids"].to(topk.ids.device), topk.ids).tolist()
                names.update((i, n) for i, n, e in zip(batch["ids"].tolist(), batch["names"], entered) if e)
        if batch["last"]:
            done.append(batch["shard"])
            computed.append(batch["shard"])
            if names:
                held = set(topk.ids.flatten().tolist())
                names = {i: n for i, n in names.items() if i in held}
            save_state(state_path, dict(fingerprint=fingerprint, done=done, topk=topk.state_dict(),
                                        names=names, counts=counts))
    bar.close()
    seconds = time.perf_counter() - t0
    return dict(topk=topk.state_dict(), names=names, counts=counts, computed=computed,
                resumed=len(mine) - len(todo), images_now=images_now, seconds=seconds,
                peak_rss_mb=peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports KiB), DataLoader workers not included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024




def merge_ranks(parts: list[dict], num_classes: int, k: int) -> tuple[TopKPerClass, dict]:
    total = TopKPerClass(num_classes, k)
    names = {}
    for part in parts:
        total.absorb(part["topk"]["scores"], part["topk"]["ids"])
        names.update(part["names"])
    return total, names


# ---------------------------------------------------------------------------------------------------
# Outputs.


def mined_entries(topk: TopKPerClass, pool: Pool, names: dict) -> list[tuple[str, int, float]]:
    """(path or shard#key, class, score), class by class, best first."""
    name_of = (lambda i: pool.samples[i][0]) if pool.kind == "files" else names.__getitem__
    return [(name_of(i), c, s) for c, i, s in topk.entries()]


def write_list(path: Path, lines) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in lines)))


def write_mined_list(out: Path, entries, pool: Pool) -> Path:
    """`relpath class score`; WebDataset images are named shard.tar#key (export them with --write-shards)."""
    place = (lambda p: relative_to(p, out.parent)) if pool.kind == "files" else (lambda p: p)
    return write_list(out, (f"{place(p)} {c} {s:.6f}" for p, c, s in entries))  # always a dot: not a label


def class_summary(entries, num_classes: int, k: int, class_names=None) -> list[dict]:
    rows = [dict(cls=c, name=class_names[c] if class_names else str(c), count=0, min=None, max=None)
            for c in range(num_classes)]
    for _, c, s in entries:
        r = rows[c]
        r["count"] += 1
        r["min"] = s if r["min"] is None else min(r["min"], s)
        r["max"] = s if r["max"] is None else max(r["max"], s)
    return rows


def format_counts(rows, k: int) -> str:
    counts = [r["count"] for r in rows]
    short = sum(c < k for c in counts)
    text = [f"per class: min {min(counts)}, max {max(counts)}, mean {sum(counts) / len(counts):.1f} "
            f"(k={k}; {short} class(es) below k)"]
    if len(rows) <= 32:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            lo = "-" if r["min"] is None else f"{r['min']:.4f}"
            hi = "-" if r["max"] is None else f"{r['max']:.4f}"
            text.append(f"  {r['cls']:>4} {r['name']:<{width}} {r['count']:>6}  score {lo}..{hi}")
    return "\n".join(text)


def merge_with_train(train_spec, entries, pool: Pool, merged: Path) -> int:
    """The final SSLD list: the labeled train images, then the mined ones, as `relpath label` lines (the
    PaddleClas format the trainer reads); the scores stay in the mined list. Returns the line count."""
    if pool.kind != "files":
        raise UserError("--merge-with needs a folder or list-file pool; for WebDataset pools export the mined "
                        "images with --write-shards and give the trainer both sources")
    train = Path(train_spec)
    if train.is_dir():
        samples = folder_source(train).samples
    elif train.is_file():
        samples = list_source(train).samples
    else:
        raise UserError(f"--merge-with {train_spec}: not found (expected an ImageFolder or a list file)")
    lines = [relative_to(p, merged.parent) + ("" if label == UNLABELED else f" {label}") for p, label in samples]
    lines += [f"{relative_to(p, merged.parent)} {c}" for p, c, _ in entries]
    write_list(merged, lines)
    return len(lines)


def write_mined_shards(out_dir: Path, pool: Pool, topk: TopKPerClass, dist) -> int:
    """Copy this rank's selected WebDataset samples into OUT_DIR/mined-rRRR-NNNNNN.tar with their class
    (`cls`) and score, one sample per (image, class) line. Returns the number written."""
    import webdataset as wds

    chosen: dict[int, list] = {}
    for c, i, s in topk.entries():
        chosen.setdefault(i, []).append((c, s))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    wanted = {pool.shard_of(i) for i in chosen}
    shards = [s for s in pool.shards_of_rank(dist.rank, dist.world_size) if s in wanted]
    with wds.ShardWriter(str(out_dir / f"mined-r{dist.rank:03d}-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for shard in shards:
            url = pool.urls[shard]
            for pos, sample in enumerate(wds.tarfile_samples([{"url": url}], handler=wds.warn_and_continue)):
                for c, s in chosen.get((shard << WDS_ID_BITS) | pos, []):
                    key = next(k for k in WDS_IMAGE_KEYS if k in sample)
                    sink.write({"__key__": f"{sample['__key__']}_c{c}", key: sample[key], "cls": str(c),
                                "score.txt": f"{s:.6g}"})
                    written += 1
    return written




# ---------------------------------------------------------------------------------------------------
# CLI.

def parse_mine_args(argv):
    parser = ArgumentParser(prog="python -m distill.mine", description=__doc__.splitlines()[0],
                                     epilog="subcommands: dedup (near-duplicates of the eval set), bench")
    add_teacher_args(parser)
    parser.add_argument("--pool", required=True, help="folder, list file or WebDataset shards")
    parser.add_argument("--k", type=number_in(int, 1), required=True, help="images kept per class")
    parser.add_argument("-o", "--out", required=True, help="mined list to write (relpath class score)")
    parser.add_argument("--assign", default="all", choices=ASSIGN_MODES,
                        help="all (SSLD): every class ranks every image, so an image may be listed under "
                             "several classes, one line each; top1: an image competes only for its "
                             "teacher's top-1 class and is listed at most once")
    parser.add_argument("--exclude", help="leave out these images (the removed list written by dedup)")
    parser.add_argument("--merge-with", metavar="TRAIN", help="labeled train list or ImageFolder to merge "
                        "with the mined images into the final SSLD list")
    parser.add_argument("--merged", help="where the final list goes (default OUT_merged.txt)")
    parser.add_argument("--write-shards", metavar="DIR", help="WebDataset pool: copy the mined samples "
                        "(with cls and score) into new shards under DIR, for the trainer")
    parser.add_argument("--class-names", help="file with one class name per line, for the summary")
    parser.add_argument("--state-dir", help="resume state (default OUT_state/; removed after success)")
    parser.add_argument("--fresh", action="store_true", help="ignore a previous run's state")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)   # ranges are checked by the number_in types, naming the flag


def stem_path(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def main(argv=None):
    args = parse_mine_args(argv)
    out = Path(args.out)
    # Inputs first (cheap): a bad path fails before any model is built.
    pool = open_pool(args.pool, args.shard_size)
    exclude = normalized_exclude(pool, read_exclude(args.exclude)) if args.exclude else frozenset()
    class_names = None
    if args.class_names:
        if not Path(args.class_names).is_file():
            raise UserError(f"--class-names {args.class_names}: file not found")
        class_names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
    if args.write_shards and pool.kind != "wds":
        raise UserError("--write-shards is for WebDataset pools; a file pool's mined list is read directly")
    dist = init_distributed(args.device)
    try:
        teacher, transform, num_classes, _ = load_mining_teacher(args.teacher, args.num_classes, args.input_size,
                                                                 args.pretrained)
        if class_names is not None and len(class_names) != num_classes:
            raise UserError(f"--class-names {args.class_names} has {len(class_names)} names; "
                            f"the teacher predicts {num_classes} classes")
        teacher.to(dist.device)
        state_dir = Path(args.state_dir) if args.state_dir else stem_path(out, "_state")
        state_path = state_dir / f"rank{dist.rank:03d}-of-{dist.world_size:03d}.pt"
        if args.fresh and dist.is_main:
            shutil.rmtree(state_dir, ignore_errors=True)
        barrier()
        others = sorted(p.name for p in state_dir.glob("rank*-of-*.pt")
                        if not p.name.endswith(f"-of-{dist.world_size:03d}.pt")) if state_dir.is_dir() else []
        if others:
            raise UserError(f"{state_dir} holds an interrupted run with another number of processes ({others[0]}); "
                            "resume it with that many, or pass --fresh to start over")
        fingerprint = dict(pool=os.path.abspath(args.pool), pool_size=pool.size, shards=pool.num_shards,
                           shard_size=pool.shard_size, teacher=list(args.teacher), k=args.k, assign=args.assign,
                           input_size=args.input_size, num_classes=num_classes, amp=teacher_amp(args.amp, dist.device),
                           exclude=len(exclude))
        if dist.is_main:
            print(f"mine: teacher {', '.join(args.teacher)} ({num_classes} classes) over {pool.describe()}; "
                  f"top {args.k} per class (assign {args.assign}); {dist.world_size} process(es) on "
                  f"{dist.device}", file=sys.stderr)
        result = mine_rank(pool, teacher, transform, num_classes, k=args.k, assign=args.assign,
                           batch_size=args.batch_size, workers=args.workers, dist=dist, state_path=state_path,
                           fingerprint=fingerprint, fresh=args.fresh, exclude=exclude, amp=args.amp,
                           progress=not args.no_progress)
        parts = gather(result)
        topk, names = merge_ranks(parts, num_classes, args.k)
        entries = mined_entries(topk, pool, names)
        shards_written = write_mined_shards(Path(args.write_shards), pool, topk, dist) if args.write_shards else 0
        shards_written = sum(gather(shards_written))
        if dist.is_main:
            finish(args, out, pool, entries, parts, num_classes, class_names, shards_written)
        barrier()
        state_path.unlink(missing_ok=True)
        remove_stale_temporaries(state_path)   # a kill mid-save left one: it would keep state_dir from going
        barrier()
        if dist.is_main and state_dir.is_dir() and not any(state_dir.iterdir()):
            state_dir.rmdir()
    finally:
        cleanup()


def finish(args, out, pool, entries, parts, num_classes, class_names, shards_written):
    write_mined_list(out, entries, pool)
    rows = class_summary(entries, num_classes, args.k, class_names)
    images = sum(p["counts"]["images"] for p in parts)
    images_now = sum(p["images_now"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    summary = dict(
        pool=args.pool, teacher=list(args.teacher), k=args.k, assign=args.assign, num_classes=num_classes,
        lines=len(entries), unique_images=len({e[0] for e in entries}), pool_images_scored=images,
        skipped_images=sum(p["counts"]["skipped"] for p in parts), excluded=bool(args.exclude),
        shards=pool.num_shards, shards_resumed=sum(p["resumed"] for p in parts),
        computed_shards=sorted(s for p in parts for s in p["computed"]), processes=len(parts),
        seconds=round(seconds, 3), images_per_s=round(images_now / max(seconds, 1e-9), 1),
        peak_rss_mb=round(max(p["peak_rss_mb"] for p in parts), 1), per_class=rows)
    merged = None
    if args.merge_with:
        merged = Path(args.merged) if args.merged else stem_path(out, "_merged.txt")
        summary["merged"] = dict(path=str(merged), lines=merge_with_train(args.merge_with, entries, pool, merged))
    if shards_written:
        summary["shards_written"] = dict(dir=args.write_shards, samples=shards_written)
    summary_path = stem_path(out, "_summary.json")
    atomic_write(summary_path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    print(format_counts(rows, args.k), file=sys.stderr)
    print(f"mined {len(entries)} lines ({summary['unique_images']} distinct images) from "
          f"{images} scored pool images ({summary['skipped_images']} unreadable skipped) -> {out}; "
          f"{summary['images_per_s']:.0f} img/s, peak RSS {summary['peak_rss_mb']:.0f} MB; summary {summary_path}"
          + (f"; final SSLD list {merged} ({summary['merged']['lines']} lines)" if merged else "")
          + (f"; {shards_written} samples in shards under {args.write_shards}" if shards_written else ""))


