"""Write the teacher's soft labels for every crop a training run will draw, once, for many students.

    python -m distill.relabel -c RECIPE --out-dir LABELS/ [-o KEY=VALUE] [--epochs E] [--k 10]

The recipe is a distill.ssld recipe (-c FILE|NAME, -o KEY=VALUE). For each of E epochs this walks the very
batches distill.ssld would draw (the epoch plan, cut into global batches, rank r taking slice r), draws each
crop and flip with the trainer's sampler under the trainer's seed, runs the teacher as the trainer does (its
BatchNorm mode, ensemble, resolution, the recipe's run.amp, inference mode) and keeps the top-k classes and
probabilities per crop (distill/label_cache.py has the format). Then `teacher.cache: LABELS/` in the recipe
trains any number of students without a teacher forward.

    python -m distill.relabel -c configs/demo.yaml --out-dir runs/demo/labels --k 8
    torchrun --nproc_per_node 8 -m distill.relabel -c r50 --out-dir labels/r50 --epochs 360

A teacher with BatchNorm in train mode (teacher.bn: train, the PaddleClas default) depends on its batch: run
relabel with the world size and data.batch_size training will use, and training refuses any other. With
teacher.bn: eval any world size writes the same labels, and any batch size whose epoch they cover trains.
Rerunning the same command continues: finished shards (checked by their header) are kept, the rest are
written; a larger --epochs adds epochs. WebDataset sources are refused (a record replays its crop from the
image by index).
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distill import ssld
from distill.core.config import add_config_args, load_config
from distill.core.distributed import barrier, cleanup, init_distributed, per_rank_batch
from distill.core.errors import ArgumentParser, UserError, number_in, run_cli
from distill.core.images import Skipped, normalize_on_device
from distill.core.precision import Precision
from distill.core.progress import Progress
from distill.core.trainer_kit import seed_for_build
from distill.data import TrainStream, stream_loader
from distill.label_cache import (AUGMENTS, DEFAULT_K, FORMAT, TAIL, label_settings, manifest_path, narrowest,
                                 part_header, part_path, read_manifest, refuse_streams, settings_hash,
                                 teacher_temperature, write_manifest, write_part)
from distill.teacher import build_teacher

SHARD_IMAGES = 65536   # images per shard by default: ~4 MB of records at k=10; a kill redoes at most one


# ---------------------------------------------------------------------------------------------------
# The stream of drawn crops.

class _RecordDraw:
    """The trainer's transform, returning the box and flip it drew along with the pixels."""

    def __init__(self, transform):
        self.transform = transform

    def load(self, src):
        return self.transform.load_drawn(src)


class DrawnStream(TrainStream):
    """TrainStream's batches with items (image, box, flip, position): the trainer's crops, and where they are."""

    def __init__(self, sources, transform, *args, **kwargs):
        super().__init__(sources, _RecordDraw(transform), *args, **kwargs)

    def load_item(self, pos: int, data, label: int, where: str):
        item = super().load_item(pos, data, label, where)
        return item if isinstance(item, Skipped) else (*item[0], pos)


def collate_drawn(batch):
    """-> (images uint8, positions, boxes (N, 4) top/left/height/width, flips, skipped)."""
    skipped = [b for b in batch if isinstance(b, Skipped)]
    good = [b for b in batch if not isinstance(b, Skipped)]
    if not good:
        return torch.empty(0, dtype=torch.uint8), np.empty(0, np.int64), np.empty((0, 4), np.int64), \
            np.empty(0, np.uint8), skipped
    return (torch.stack([g[0] for g in good]), np.array([g[3] for g in good], np.int64),
            np.array([g[1] for g in good], np.int64).reshape(-1, 4), np.array([g[2] for g in good], np.uint8),
            skipped)


# ---------------------------------------------------------------------------------------------------
# Checks and the manifest.

def check_recipe(cfg) -> None:
    """The trainer's own recipe checks, then what makes a recipe uncachable, in one line each."""
    if cfg.teacher is None or not cfg.teacher.get("models"):
        raise UserError("the recipe has no teacher (teacher.models): there are no soft labels to write")
    ssld.check(cfg)
    refuse_streams(cfg)
    if cfg.data.augment not in AUGMENTS:
        raise UserError(f"data.augment={cfg.data.augment!r} draws no random crop; cached labels are per crop "
                        f"({' or '.join(AUGMENTS)})")
    if cfg.data.function_matching:
        raise UserError("data.function_matching: a mixed view blends two images at a weight drawn each step, so "
                        "no cached label can hold it (train it with the online teacher)")


def teacher_digest(model) -> str:
    """sha256 of the weights (every tensor of the state dict, in key order): names the teacher exactly, even a
    checkpoint retrained under the same path."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def scan(cache_dir, manifest: dict, epochs: int) -> dict:
    """Complete leading epochs and the totals, from the part files' headers (the truth after any kill)."""
    m = manifest
    complete, records, skipped, size = 0, 0, 0, 0
    for epoch in range(epochs):
        whole = True
        for shard in range(m["shards_per_epoch"]):
            for rank in range(m["world_size"]):
                path = part_path(cache_dir, epoch, shard, rank, m["world_size"])
                header = part_header(path)
                if header is None or header["fingerprint"] != m["fingerprint"]:
                    whole = False
                    continue
                records += header["records"]
                skipped += header["skipped"]
                size += path.stat().st_size
        if whole and complete == epoch:
            complete = epoch + 1
    return dict(epochs=complete, counts=dict(records=records, skipped=skipped, bytes=size,
                                             bytes_per_record=round(size / records, 2) if records else None))


def part_done(path, fingerprint: str) -> bool:
    header = part_header(path)
    return header is not None and header["fingerprint"] == fingerprint


def contiguous_runs(items):
    """[0, 1, 2, 5, 6] -> [(0, 2), (5, 6)]."""
    runs = []
    for i in items:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [tuple(r) for r in runs]


# ---------------------------------------------------------------------------------------------------
# Writing.

LAYOUT_KEYS = ("k", "world_size", "per_rank_batch", "global_batch", "shard_batches")   # how the files are cut


def write_labels(cfg, out_dir, epochs: int, dist, *, k: int = DEFAULT_K, shard_batches: int | None = None,
                 progress: bool = True) -> dict:
    """Write (or continue) the cache for epochs 0..epochs-1, this rank's part of every shard; returns the
    manifest once every rank is done."""
    check_recipe(cfg)
    out_dir, d = Path(out_dir), cfg.data
    data = ssld.load_data(cfg)
    sources, num_classes = data.train, data.num_classes
    seed_for_build(cfg.run.seed)   # a random-init timm: teacher (tests, benchmarks) is the same on every rank
    teacher = build_teacher(cfg.teacher, num_classes, d.mean, d.std)
    teachers = [dict(source=str(s), arch=meta.get("arch"), sha256=teacher_digest(m))
                for s, m, meta in zip(cfg.teacher.models, teacher.models, teacher.metas)]
    teacher.to(dist.device)
    transform = ssld.train_transform(cfg)
    stream = DrawnStream(sources, transform, per_rank_batch(d.batch_size, dist), d.epoch_samples, cfg.run.seed,
                         dist.rank, dist.world_size, d.shuffle_buffer)
    manifest = open_cache(out_dir, cfg, stream, sources, num_classes, teachers, epochs, min(int(k), num_classes),
                          shard_batches, dist)
    todo = {e: [s for s in range(manifest["shards_per_epoch"])
                if not part_done(part_path(out_dir, e, s, dist.rank, dist.world_size), manifest["fingerprint"])]
            for e in range(epochs)}
    say = (lambda text: print(text, file=sys.stderr)) if dist.is_main else (lambda text: None)
    resumed = epochs * manifest["shards_per_epoch"] - sum(map(len, todo.values()))
    say(f"relabel: {', '.join(t['source'] for t in teachers)} (bn {cfg.teacher.bn}, "
        f"{manifest['teacher_input_size']} px, amp {cfg.run.amp}) -> top-{manifest['k']} of {num_classes} for "
        f"{epochs} epoch(s) x {manifest['positions_per_epoch']} crops, {manifest['shards_per_epoch']} shard(s) an "
        f"epoch, {dist.world_size} process(es) on {dist.device}"
        + (f"; {resumed} shard(s) of rank {dist.rank} already written" if resumed else ""))
    crops, seconds = label_shards(out_dir, manifest, todo, cfg, teacher, stream, dist, progress)
    barrier()
    if dist.is_main:
        manifest.update(scan(out_dir, manifest, manifest["epochs_requested"]))
        manifest["last_run"] = dict(crops=crops, seconds=round(seconds, 3))   # the write cost, as measured
        write_manifest(out_dir, manifest)
    barrier()
    manifest = read_manifest(out_dir)
    c = manifest["counts"]
    say(f"relabel: {out_dir} holds {manifest['epochs']} complete epoch(s): {c['records']} records "
        f"({c['skipped']} unreadable images skipped), {c['bytes'] / 2**20:.1f} MiB, "
        f"{c['bytes_per_record']} bytes per image-epoch; this run {crops} crops in {seconds:.1f} s")
    return manifest


def open_cache(out_dir: Path, cfg, stream, sources, num_classes: int, teachers: list, epochs: int, k: int,
               shard_batches: int | None, dist) -> dict:
    """The manifest of this run: a new cache's, or an existing one's if it was written with the same
    settings (else refused, naming what differs). Rank 0 writes it before any label, so the parts a killed
    run left are recognised by its fingerprint."""
    if len(sources) > 255 or max(s.size for s in sources) >= 2**31 or stream.epoch_samples >= 2**31:
        raise UserError("more than 255 sources, or 2^31 images in one source or epoch: beyond the record format "
                        "(uint8 source, int32 index and position)")
    d = cfg.data
    previous = read_manifest(out_dir) if manifest_path(out_dir).is_file() else None
    if shard_batches is None:
        shard_batches = previous["shard_batches"] if previous else max(1, SHARD_IMAGES // d.batch_size)
    settings = label_settings(cfg, sources, num_classes, dist.world_size)
    nb = stream.batches_per_epoch
    manifest = dict(
        format=FORMAT, written_by="python -m distill.relabel", settings=settings, settings_hash=settings_hash(settings),
        teachers=teachers, num_classes=num_classes, k=k, tail=TAIL, temperature=teacher_temperature(cfg),
        bn=cfg.teacher.bn, teacher_input_size=cfg.teacher.input_size or d.input_size, amp=cfg.run.amp,
        world_size=dist.world_size, per_rank_batch=stream.batch_size, global_batch=d.batch_size,
        shard_batches=int(shard_batches), shards_per_epoch=-(-nb // shard_batches), batches_per_epoch=nb,
        positions_per_epoch=nb * d.batch_size, epoch_samples=stream.epoch_samples,
        sources=[dict(type=s.type, path=s.path, size=s.size) for s in sources],
        record_bytes=4 + 1 + 4 + 4 * 2 + 1 + k * (2 if num_classes <= 32768 else 4) + k * 2,  # uint16 boxes
        epochs_requested=max(epochs, previous["epochs_requested"] if previous else 0),
        epochs=previous["epochs"] if previous else 0, counts=previous["counts"] if previous else {})
    identity = {**settings, **{key: manifest[key] for key in LAYOUT_KEYS},
                "teacher weights": [t["sha256"] for t in teachers]}
    manifest["fingerprint"] = settings_hash(identity)
    if previous is not None and previous["fingerprint"] != manifest["fingerprint"]:
        saved = {**previous["settings"], **{key: previous.get(key) for key in LAYOUT_KEYS},
                 "teacher weights": [t["sha256"] for t in previous["teachers"]]}
        differ = [key for key in identity if saved.get(key) != identity[key]]
        raise UserError(f"{out_dir} holds labels written with other settings ("
                        f"{', '.join(f'{key} {saved.get(key)!r} -> {identity[key]!r}' for key in differ)}); "
                        "rerun with those to continue it, or choose another --out-dir")
    if dist.is_main:
        write_manifest(out_dir, manifest)
    barrier()
    return manifest


def label_shards(out_dir: Path, manifest: dict, todo: dict, cfg, teacher, stream, dist, progress: bool):
    """Label this rank's missing shards ({epoch: [shard]}), each run of consecutive shards in one pass of
    the loader; every shard is written atomically once its batches are done. Returns (crops, seconds)."""
    d, S, nb, k = cfg.data, manifest["shard_batches"], manifest["batches_per_epoch"], manifest["k"]
    crops = sum(min(S, nb - s * S) for shards in todo.values() for s in shards) * d.batch_size
    precision, temperature = Precision(cfg.run.amp, dist.device), teacher_temperature(cfg)
    loader = stream_loader(stream, cfg.run.workers, dist.device, collate_drawn)
    bar = Progress(crops, "relabel", enabled=progress and dist.is_main and crops > 0)
    start = time.perf_counter()
    for epoch, shards in todo.items():
        if not shards:
            continue
        stream.set_epoch(epoch)
        plan = stream.plan()
        for first, last in contiguous_runs(shards):
            stream.set_epoch(epoch, first * S)
            batches = iter(loader)
            for shard in range(first, last + 1):
                parts, skipped = [], 0
                for _ in range(shard * S, min((shard + 1) * S, nb)):
                    images, positions, boxes, flips, skip = next(batches)
                    skipped += len(skip)
                    if len(images):   # the trainer's teacher call: same batch, normalisation, autocast
                        x = normalize_on_device(images.to(dist.device, non_blocking=True), d.mean, d.std)
                        with precision.autocast():
                            top = teacher(x, temperature).topk(k, dim=1)
                        parts.append((positions, boxes, flips, top.indices.cpu().numpy(), top.values.cpu().numpy()))
                    bar.update((len(images) + len(skip)) * dist.world_size)
                write_part(part_path(out_dir, epoch, shard, dist.rank, dist.world_size),
                           records(parts, plan, k, manifest["num_classes"]),
                           dict(format=FORMAT, fingerprint=manifest["fingerprint"], epoch=epoch, shard=shard,
                                rank=dist.rank, world_size=dist.world_size, records=sum(len(p[0]) for p in parts),
                                skipped=skipped, k=k))
            del batches
    bar.close()
    return crops, time.perf_counter() - start


def records(parts, plan: np.ndarray, k: int, num_classes: int) -> dict:
    """The part file's arrays, in position order (module docstring of distill.label_cache)."""
    if parts:
        positions, boxes, flips, idx, prob = (np.concatenate(a) for a in zip(*parts))
    else:
        positions, boxes, flips = np.empty(0, np.int64), np.empty((0, 4), np.int64), np.empty(0, np.uint8)
        idx, prob = np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    return dict(position=positions.astype(np.int32), source=plan[positions, 0].astype(np.uint8),
                index=plan[positions, 1].astype(np.int32),
                box=boxes.astype(narrowest(boxes, np.uint16, np.int32)),
                flip=flips.astype(np.uint8), topk_idx=idx.astype(np.int16 if num_classes <= 32768 else np.int32),
                topk_prob=prob.astype(np.float16))


# ---------------------------------------------------------------------------------------------------
# CLI.

def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m distill.relabel", description=__doc__.splitlines()[0])
    add_config_args(parser, required=True)
    parser.add_argument("--out-dir", help="the label cache folder (default: the recipe's teacher.cache)")
    parser.add_argument("--epochs", type=number_in(int, 1), help="epochs to label (default: schedule.epochs)")
    parser.add_argument("--k", type=number_in(int, 1), default=DEFAULT_K,
                        help=f"classes kept per crop, fp16 (default {DEFAULT_K}; at most the class count)")
    parser.add_argument("--shard-batches", type=number_in(int, 1),
                        help=f"global batches per shard file (default: about {SHARD_IMAGES} images)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.override, ssld.DEFAULTS, renamed=ssld.RENAMED)
    out_dir = args.out_dir or (cfg.teacher or {}).get("cache")
    if not out_dir:
        raise UserError("give --out-dir LABELS/ (or set teacher.cache in the recipe)")
    dist = init_distributed(cfg.run.device)
    try:
        return write_labels(cfg, out_dir, args.epochs or int(cfg.schedule.epochs), dist, k=args.k,
                            shard_batches=args.shard_batches, progress=cfg.run.progress and not args.no_progress)
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)
