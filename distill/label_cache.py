"""Cached teacher soft labels per crop (FKD, Shen & Xing): what `python -m distill.relabel` writes and what
training from `teacher.cache: LABELS/` reads.

For every training position (epoch, plan position) the cache holds the crop box and flip the student's
pipeline drew there and the teacher's top-k classes and probabilities for that exact view. Training replays
the crop from the record and takes the stored labels, so no teacher runs and the views stay consistent; a
student zoo or a sweep pays for one teacher pass.

Layout (LABELS/):

    manifest.json                                  the settings the labels depend on (compared before use),
                                                   the teachers and their weights' hashes, k, epochs, counts
    epoch-0000/shard-00000-rank-000-of-001.safetensors
                                                   one writer rank's records of one shard: a fixed number of
                                                   global batches of one epoch, written atomically

Records (per part file, one row per readable image, in position order): `position` int32 (plan index within
the epoch), `source` uint8 and `index` int32 (the image: data.train[source].samples[index]), `box` uint16
(int32 past 65535 px) (top, left, height, width) in full-image pixels, `flip` uint8, `topk_idx` int16
(int32 past 32768 classes) and `topk_prob` float16, both (N, k). The epoch, shard and writer rank are in the
file's safetensors header. A position without a record held an unreadable image; training skips it too.

The mass outside the top-k: spread evenly over the other classes (`dense_targets`). That keeps the target a
distribution and every class above zero: renormalising the top-k would put zeros there, which the ssld
loss's p log(p/q) term answers with log(1/eps) = 28 per unit of student mass, pushing the student's tail to
nothing: a sharper teacher than the real one. With k >= classes the stored distribution is the teacher's, to
fp16.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distill.core.atomic import atomic_write
from distill.core.distributed import per_rank_batch
from distill.core.errors import UserError
from distill.core.images import Skipped, UnreadableImage, build_transform, crop_area
from distill.data import TrainStream, stream_loader

FORMAT = "ssld-label-cache/1"
MANIFEST = "manifest.json"
DEFAULT_K = 10                  # 4 bytes a class (int16 + fp16): 58-byte records; docs/benchmarks.md sizes them
RECORD_KEYS = ("position", "source", "index", "box", "flip", "topk_idx", "topk_prob")
TAIL = "uniform"                # how dense_targets fills the classes outside the top-k
AUGMENTS = ("random_crop", "inception")


# ---------------------------------------------------------------------------------------------------
# What the labels depend on.

def samples_digest(source) -> str:
    """sha256 of a map-style source's image paths, relative to their common folder: a changed, added or
    reordered image changes the epoch plan's meaning, a moved dataset does not."""
    paths = [p for p, _ in source.samples]
    base = os.path.commonpath([os.path.dirname(p) or "." for p in paths]) if paths else ""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.relpath(p, base).encode() + b"\n")
    return h.hexdigest()[:16]


def effective_crop_scale(data) -> list:
    return [float(v) for v in crop_area(data.augment, data.crop_scale)]


def teacher_temperature(cfg) -> float:
    """The softmax temperature the trainer's teacher uses (distill.losses.DistillLoss: only `kl` softens)."""
    return float(cfg.loss.temperature) if cfg.loss.kind == "kl" else 1.0


def label_settings(cfg, sources=None, num_classes: int | None = None, world_size: int | None = None) -> dict:
    """{recipe key: value} of everything the cached crops and labels depend on, as dotted recipe keys so a
    difference is named the way it is set. Parts that need the built sources, the class count or the world
    size are left out when those are not given. Batch size and world size matter only for a teacher with
    BatchNorm in train mode (its output depends on its batch mates)."""
    d, t = cfg.data, cfg.teacher
    out = {
        "run.seed": int(cfg.run.seed),
        # type and weight shape the plan; the paths do not (a dataset moved to local disk is the same data),
        # its images do: compared by count and digest once the sources are built
        "data.train": [{k: s.get(k) for k in ("type", "weight")} for s in d.train],
        "data.augment": d.augment, "data.input_size": int(d.input_size), "data.crop_scale": effective_crop_scale(d),
        "data.hflip": bool(d.hflip), "data.interpolation": d.interpolation,
        "data.mean": [float(v) for v in d.mean], "data.std": [float(v) for v in d.std],
        "teacher.bn": t.bn, "teacher.input_size": t.input_size, "loss.temperature (teacher)": teacher_temperature(cfg),
    }
    if t.get("models"):
        out["teacher.models"] = [str(m) for m in t.models]
    if sources is not None:
        out["data.train (images)"] = [dict(size=s.size, samples=samples_digest(s)) for s in sources]
        out["data.epoch_samples"] = int(d.epoch_samples or sum(s.size for s in sources))
    elif d.epoch_samples:
        out["data.epoch_samples"] = int(d.epoch_samples)
    if num_classes is not None:
        out["data.num_classes"] = int(num_classes)
    if t.bn == "train":
        out["data.batch_size"] = int(d.batch_size)
        if world_size is not None:
            out["world size (torchrun processes)"] = int(world_size)
    return out


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def differing_keys(saved: dict, now: dict) -> list[str]:
    """Keys present in both whose values differ (a key only one side computed is not compared)."""
    return [k for k in now if k in saved and saved[k] != now[k]]


def describe_differences(saved: dict, now: dict, keys) -> str:
    return ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in keys)


# ---------------------------------------------------------------------------------------------------
# The manifest and the part files.

def manifest_path(cache_dir) -> Path:
    return Path(cache_dir) / MANIFEST


def read_manifest(cache_dir) -> dict:
    path = manifest_path(cache_dir)
    if not path.is_file():
        raise UserError(f"no label cache at {cache_dir} ({MANIFEST} missing); write one with "
                        f"python -m distill.relabel -c RECIPE --out-dir {cache_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path} is not a {FORMAT} manifest (format {found!r})")
    return manifest


def write_manifest(cache_dir, manifest: dict) -> Path:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    return atomic_write(manifest_path(cache_dir), lambda tmp: Path(tmp).write_text(text))


def part_path(cache_dir, epoch: int, shard: int, rank: int, world_size: int) -> Path:
    return Path(cache_dir) / f"epoch-{epoch:04d}" / f"shard-{shard:05d}-rank-{rank:03d}-of-{world_size:03d}.safetensors"


def part_header(path) -> dict | None:
    """The part file's header (epoch, shard, rank, settings hash, counts), or None if absent or unreadable:
    an unreadable part is redone, never taken as done."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # missing, truncated, foreign
        return None
    if meta.get("format") != FORMAT:
        return None
    try:
        return {k: (v if k in ("format", "fingerprint") else int(v)) for k, v in meta.items()}
    except ValueError:
        return None


def write_part(path, records: dict, header: dict) -> Path:
    """Atomic: a kill leaves either no file or the whole file, so a present part is a finished one."""
    tensors = {k: torch.as_tensor(records[k]).contiguous() for k in RECORD_KEYS}
    meta = {k: str(v) for k, v in header.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_part(path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in RECORD_KEYS}


def narrowest(values: np.ndarray, small, large):
    """The smaller integer dtype when every value fits it (storage per record), else the larger."""
    return small if values.size == 0 or int(values.max()) <= np.iinfo(small).max else large


# ---------------------------------------------------------------------------------------------------
# Training from the cache.

def dense_targets(idx: torch.Tensor, prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, num_classes) float32 teacher probabilities from the stored top-k: the top-k exactly as stored, the
    rest of the mass (1 - their sum, at least 0) spread evenly over the other classes (module docstring)."""
    prob = prob.float()
    rest = (1.0 - prob.sum(1, keepdim=True)).clamp_(min=0.0) / max(num_classes - prob.shape[1], 1)
    return rest.expand(len(prob), num_classes).clone().scatter_(1, idx.long(), prob)


def refuse_streams(cfg) -> None:
    """WebDataset sources are refused: a record names its image by (source, index) and training replays the
    crop from that image, which needs random access a tar stream does not give."""
    streams = [s.get("path") for s in cfg.data.train if s.get("type") == "wds"]
    if streams:
        raise UserError(f"data.train source {streams[0]!r} is WebDataset: cached labels replay each crop from its "
                        "image by index, which a tar stream cannot give; list the images (folder or list source) "
                        "or train with the online teacher")


def check_cache_compatible(cfg, manifest: dict, *, sources=None, num_classes: int | None = None,
                           world_size: int | None = None, cache_dir=None) -> None:
    """Refuse, in one line that says why, a training recipe the cached labels do not fit: a mixed view
    (mixup, function matching), a loss without a teacher, more epochs than were cached, settings that change
    the crops or labels (named), another class count, or a batch the cache does not cover."""
    where = cache_dir or "the label cache"
    refuse_streams(cfg)
    if cfg.data.function_matching:
        raise UserError("data.function_matching with teacher.cache: a mixed view blends two images at a weight "
                        "drawn each step, so no cached label can hold it; drop teacher.cache (the online teacher "
                        "sees every mixed view) or data.function_matching")
    if cfg.loss.kind == "ce":
        raise UserError("loss.kind ce trains without a teacher; drop teacher.cache or pick a distillation loss")
    epochs = int(cfg.schedule.epochs)
    if epochs > manifest["epochs"]:
        raise UserError(f"schedule.epochs={epochs} but {where} holds labels for {manifest['epochs']} epoch(s); "
                        f"write the rest with python -m distill.relabel -c RECIPE --epochs {epochs} "
                        f"--out-dir {where} (it continues where it stopped)")
    if num_classes is not None and num_classes != manifest["num_classes"]:
        raise UserError(f"{where} was written for {manifest['num_classes']} classes; this recipe has {num_classes}")
    now = label_settings(cfg, sources, num_classes, world_size)
    if not cfg.teacher.get("models"):
        now.pop("teacher.models", None)
    saved = manifest["settings"]
    differ = differing_keys(saved, now)
    if differ:
        raise UserError(f"the recipe differs from {where} in what the cached crops and labels depend on: "
                        f"{describe_differences(saved, now, differ)}; write a cache for this recipe with "
                        f"python -m distill.relabel, or train with the online teacher")
    if world_size is not None:
        G = int(cfg.data.batch_size)
        epoch_samples = now.get("data.epoch_samples", manifest["epoch_samples"])
        needed = epoch_samples // G * G
        if needed > manifest["positions_per_epoch"]:
            raise UserError(f"data.batch_size={G} draws {needed} images an epoch but {where} covers the first "
                            f"{manifest['positions_per_epoch']} (written at global batch {manifest['global_batch']}); "
                            f"use a batch size that divides the epoch no finer, or relabel at this one")


class ShardLabels:
    """Position -> record lookups for one epoch at a time, holding one shard (every writer rank's part) in
    memory: positions arrive in increasing order within an epoch, so memory is one shard, whatever the
    dataset's size."""

    def __init__(self, cache_dir, manifest: dict):
        self.dir, self.manifest = Path(cache_dir), manifest
        self.span = manifest["shard_batches"] * manifest["global_batch"]   # positions per shard
        self.key, self.records = None, None

    def _load(self, epoch: int, shard: int) -> None:
        m = self.manifest
        parts = []
        for rank in range(m["world_size"]):
            path = part_path(self.dir, epoch, shard, rank, m["world_size"])
            if not path.is_file():
                raise UserError(f"{path} is missing; rerun python -m distill.relabel with the same arguments "
                                "to write it")
            parts.append(read_part(path))
        records = {k: np.concatenate([p[k] for p in parts]) for k in RECORD_KEYS}
        order = np.argsort(records["position"], kind="stable")
        self.records = {k: v[order] for k, v in records.items()}
        self.key = (epoch, shard)

    def lookup(self, epoch: int, position: int):
        """(source, index, box, flip, topk_idx, topk_prob) at this position, or None (no record: the image was
        unreadable when the labels were written)."""
        key = (epoch, position // self.span)
        if key != self.key:
            self._load(*key)
        r = self.records
        i = int(np.searchsorted(r["position"], position))
        if i == len(r["position"]) or int(r["position"][i]) != position:
            return None
        box = tuple(int(v) for v in r["box"][i])
        return (int(r["source"][i]), int(r["index"][i]), box, bool(r["flip"][i]),
                torch.from_numpy(r["topk_idx"][i].astype(np.int64)), torch.from_numpy(r["topk_prob"][i].copy()))


class CachedStream(TrainStream):
    """TrainStream's batches, ranks, workers and resume, with each position's crop replayed from its record
    instead of drawn: items are (uint8 image, label, topk_idx, topk_prob), the pixels the teacher saw."""

    def __init__(self, labels: ShardLabels, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels = labels

    def load_item(self, pos: int, data, label: int, where: str):
        record = self.labels.lookup(self.epoch, pos)
        if record is None:
            return Skipped(where, f"{where}: no cached label (unreadable when the labels were written)")
        source, index, box, flip, topk_idx, topk_prob = record
        if self.sources[source].samples[index][0] != where:   # the plan and the records disagree: not this data
            raise UserError(f"label cache record at epoch {self.epoch}, position {pos} names image {index} of "
                            f"source {source}, but the plan has {where}; the data changed since the labels were "
                            "written")
        try:
            image = self.transform.load_drawn(data, (box, flip))[0]
        except UnreadableImage as e:
            return Skipped(where, str(e))
        return image, label, topk_idx, topk_prob


def collate_cached(batch):
    """-> (images uint8, labels, topk_idx (N, k) int64, topk_prob (N, k) float16, skipped)."""
    skipped = [b for b in batch if isinstance(b, Skipped)]
    good = [b for b in batch if not isinstance(b, Skipped)]
    if not good:
        return (torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0, dtype=torch.float16), skipped)
    return (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good], dtype=torch.long),
            torch.stack([g[2] for g in good]), torch.stack([g[3] for g in good]), skipped)


def check_parts_present(cache_dir, manifest: dict, epochs: int) -> None:
    """Every part file the first `epochs` epochs need exists (a stat each): a missing one is named before
    training starts, not mid-epoch in a worker."""
    m = manifest
    for epoch in range(epochs):
        for shard in range(m["shards_per_epoch"]):
            for rank in range(m["world_size"]):
                path = part_path(cache_dir, epoch, shard, rank, m["world_size"])
                if not path.is_file():
                    raise UserError(f"{path} is missing; rerun python -m distill.relabel with the same arguments "
                                    "to write it")


def build_cached_stream(cfg, cache_dir, sources, dist, num_classes: int):
    """(stream, loader, manifest) for training from cached labels; the counterpart of distill.ssld's
    build_train_loader. Checks the recipe against the cache first (check_cache_compatible)."""
    manifest = read_manifest(cache_dir)
    check_cache_compatible(cfg, manifest, sources=sources, num_classes=num_classes, world_size=dist.world_size,
                           cache_dir=cache_dir)
    check_parts_present(cache_dir, manifest, int(cfg.schedule.epochs))
    d = cfg.data
    transform = build_transform(d.augment, d.input_size, d.mean, d.std, d.crop_pct, d.crop_scale, d.hflip,
                                d.interpolation, output="uint8")
    batch = per_rank_batch(d.batch_size, dist)
    stream = CachedStream(ShardLabels(cache_dir, manifest), sources, transform, batch, d.epoch_samples,
                          cfg.run.seed, dist.rank, dist.world_size, d.shuffle_buffer)
    return stream, stream_loader(stream, cfg.run.workers, dist.device, collate_cached), manifest
