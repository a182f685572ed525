"""Classification data: ImageFolder trees, PaddleClas list files, WebDataset shards, mixed by a ratio.

Sources are checked before training starts (a missing path or an empty source is a UserError naming it).
During training a corrupt or unreadable image never crashes the run: it is skipped, and the trainer
counts and reports it (`Skipped` items are dropped by `collate_skipping`).

Training order is a deterministic *plan* per epoch: a list of (source, index) positions drawn from
(seed, epoch) alone, each image augmented with an RNG seeded by its position. So the same config gives
the same pixels in any number of workers or DDP ranks, and a resumed run continues the exact order.

    folder:  ROOT/<class>/*.jpg            labels = sorted class folders (torchvision ImageFolder)
    list:    "relpath label" or "relpath"  (PaddleClas; a line without a label is an unlabeled image)
    wds:     shard-{000..009}.tar          WebDataset keys: jpg/jpeg/png/webp image, optional cls label
"""
from __future__ import annotations

import glob
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS

from distill.core.errors import UserError
from distill.core.image_folder import list_image_folder
from distill.core.images import Skipped, UnreadableImage, load_transformed

UNLABELED = -1
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SOURCE_TYPES = ("folder", "list", "wds")


# ---------------------------------------------------------------------------------------------------
# Sources: where images come from.

@dataclass
class Source:
    """One configured source. Map-style sources hold `samples`; a wds source holds `shards`."""
    type: str
    path: str
    samples: list = field(default_factory=list)     # [(path, label)] for folder / list
    shards: list = field(default_factory=list)      # tar files for wds
    size: int = 0
    classes: list | None = None
    weight: float | None = None

    @property
    def labeled(self) -> bool:
        """Folders are labeled; a list file if any line has a label; wds shards may be (a `cls` key)."""
        return self.type != "list" or any(label != UNLABELED for _, label in self.samples)

    def describe(self) -> str:
        return f"{self.type}:{self.path} ({self.size} images)"


def _resolve(path, root) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else Path(root).expanduser() / p


def folder_source(path) -> Source:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root} (expected ROOT/<class>/<image> like torchvision ImageFolder)")
    classes, samples = list_image_folder(root)
    if not samples:
        raise UserError(f"image folder {root} holds no images (expected ROOT/<class>/*.jpg, "
                        f"extensions {', '.join(IMG_EXTENSIONS)})")
    return Source("folder", str(root), samples=samples, size=len(samples), classes=classes)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_list_line(line: str) -> tuple[str, int]:
    """`relpath label score` (a mined list), `relpath label`, or `relpath` (unlabeled) -> (relpath, label)."""
    parts = line.rsplit(" ", 2)
    if len(parts) == 3 and parts[0] and _is_int(parts[1]) and _is_float(parts[2]) and not _is_int(parts[2]):
        return parts[0].strip(), int(parts[1])
    head, _, tail = line.rpartition(" ")
    if head and _is_int(tail):
        return head.strip(), int(tail)
    return line, UNLABELED


def list_source(path, image_root=None) -> Source:
    """PaddleClas list file: `relpath label` per line, or `relpath` alone for an unlabeled image; the
    `relpath label score` lines that `python -m distill.mine` writes read as labeled images.

    Paths are relative to `image_root` (default: the list file's folder). A path with spaces needs a label.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"list file not found: {path}")
    base = Path(image_root) if image_root else path.parent
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel, label = parse_list_line(line)
        if label < UNLABELED:
            raise UserError(f"{path}:{n}: label {label} is negative")
        samples.append((str(base / rel), label))
    if not samples:
        raise UserError(f"list file {path} has no entries (expected lines 'relpath label' or 'relpath')")
    first = samples[0][0]
    if not Path(first).is_file():
        raise UserError(f"{path}: first image {first} does not exist; paths are relative to {base} "
                        "(set image_root in the source to change that)")
    return Source("list", str(path), samples=samples, size=len(samples))


def count_wds_samples(shards) -> int:
    import webdataset as wds
    return sum(1 for _ in wds.tarfile_samples([{"url": s} for s in shards], handler=wds.warn_and_continue))


def wds_source(pattern, size=None, root=None) -> Source:
    """WebDataset shards given as a glob (`pool/*.tar`), brace pattern (`pool/shard-{000..009}.tar`) or list."""
    import braceexpand

    patterns = pattern if isinstance(pattern, list) else [pattern]
    shards = []
    for p in patterns:
        for q in braceexpand.braceexpand(str(_resolve(p, root))):
            shards += sorted(glob.glob(q)) if any(c in q for c in "*?[") else [q]
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise UserError(f"WebDataset source {pattern!r}: " +
                        (f"shard not found: {missing[0]}" if missing else "no shards match"))
    size = size or count_wds_samples(shards)
    if size == 0:
        raise UserError(f"WebDataset source {pattern!r} holds no samples")
    return Source("wds", str(pattern), shards=shards, size=size)


def build_source(spec, root=None) -> Source:
    """A source from its config mapping: {type, path, [image_root], [weight], [size]} (paths relative to root)."""
    if not isinstance(spec, dict) or "type" not in spec or "path" not in spec:
        raise UserError(f"data source {spec!r} must be a mapping with 'type' ({'|'.join(SOURCE_TYPES)}) "
                        "and 'path'")
    extra = set(spec) - {"type", "path", "image_root", "weight", "size"}
    if extra:
        raise UserError(f"data source {spec!r}: unknown key(s) {', '.join(sorted(extra))}; "
                        "expected type, path, image_root, weight, size")
    kind = spec["type"]
    if kind == "folder":
        src = folder_source(_resolve(spec["path"], root))
    elif kind == "list":
        image_root = spec.get("image_root")
        src = list_source(_resolve(spec["path"], root), _resolve(image_root, root) if image_root else None)
    elif kind == "wds":
        src = wds_source(spec["path"], spec.get("size"), root)
    else:
        raise UserError(f"data source type {kind!r} unknown; expected one of {', '.join(SOURCE_TYPES)}")
    weight = spec.get("weight")
    if weight is not None and (not isinstance(weight, (int, float)) or weight < 0):
        raise UserError(f"data source {spec['path']!r}: weight must be a number >= 0, got {weight!r}")
    src.weight = weight
    return src


def check_class_lists(sources) -> None:
    """Every folder source (train and val alike) must name the same classes: a label is an index into one
    shared class list, so an extra or missing class folder (even an empty one) would shift labels silently."""
    folders = [s for s in sources if s.type == "folder"]
    if not folders:
        return
    first = folders[0]
    for other in folders[1:]:
        if other.classes != first.classes:
            only_a = sorted(set(first.classes) - set(other.classes))
            only_b = sorted(set(other.classes) - set(first.classes))
            detail = "; ".join(x for x in (f"only in {first.path}: {', '.join(only_a)}" if only_a else "",
                                          f"only in {other.path}: {', '.join(only_b)}" if only_b else "") if x) \
                or "the same names in another order"
            raise UserError(f"class folders differ between {first.path} and {other.path} ({detail}); every split "
                            "must hold the same class folders, since labels are indices into one class list")


def class_names_of(sources, num_classes: int, given=None, root=None) -> tuple[list[str] | None, str | None]:
    """(class names in label order, where they came from): `given` (a list, or a text file with one name per
    line, relative to `root`), else the folder sources' class folders; (None, None) when nothing names them."""
    where = "data.class_names"
    if isinstance(given, str):
        path = _resolve(given, root)
        if not path.is_file():
            raise UserError(f"data.class_names: no file {path} (one class name per line)")
        given, where = [line.strip() for line in path.read_text().splitlines() if line.strip()], str(path)
    if given is None:
        folder = next((s for s in sources if s.classes), None)
        if folder is None:
            return None, None
        given, where = folder.classes, folder.path
    if len(given) != num_classes:
        raise UserError(f"{where} names {len(given)} classes but the data has {num_classes}")
    return list(given), where


def infer_num_classes(sources) -> int:
    labels = [lab for s in sources for _, lab in s.samples if lab != UNLABELED]
    folders = [len(s.classes) for s in sources if s.classes]
    return max([max(labels) + 1 if labels else 0, *folders])


# ---------------------------------------------------------------------------------------------------
# The training stream.

def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of one plan position: independent of worker, rank and resume point."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


def epoch_plan(sizes, shares, epoch_samples: int, seed: int, epoch: int) -> np.ndarray:
    """(epoch_samples, 2) int64 array of (source, index); index -1 means "the next sample of a stream".

    Source i fills round(share_i * epoch_samples) positions: a map-style source draws from back-to-back
    permutations (a small source repeats, a large one gives a different subset each epoch); then all
    positions are shuffled together.
    """
    rng = np.random.default_rng([seed, epoch, 7])
    shares = np.asarray(shares, float) / float(np.sum(shares))
    counts = np.floor(shares * epoch_samples).astype(int)
    counts[np.argmax(shares)] += epoch_samples - counts.sum()
    parts = []
    for i, (size, n) in enumerate(zip(sizes, counts)):
        if n == 0:
            continue
        if size is None:  # a stream
            idx = np.full(n, -1)
        else:
            reps = -(-n // size)
            idx = np.concatenate([rng.permutation(size) for _ in range(reps)])[:n]
        parts.append(np.stack([np.full(n, i), idx], 1))
    plan = np.concatenate(parts)
    return plan[rng.permutation(len(plan))]


class TrainStream(IterableDataset):
    """The training stream: the epoch plan cut into global batches, this rank's slice of each, augmented.

    Global batch b holds plan[b*G:(b+1)*G] (G = world_size * batch_size); rank r takes its r-th slice, so
    the ranks together see exactly the single-process batch. DataLoader workers take whole batches in
    turn. WebDataset shards are split across ranks; the workers of one rank read that rank's stream and
    decode only their own images. `set_epoch(epoch, start_batch)` before iterating; the first
    `start_batch` batches are skipped without decoding (resume).
    """

    def __init__(self, sources, transform, batch_size: int, epoch_samples: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000):
        self.sources, self.transform, self.batch_size = sources, transform, batch_size
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.epoch_samples = epoch_samples or sum(s.size for s in sources)
        weights = [s.weight for s in sources]
        if any(w is not None for w in weights) and any(w is None for w in weights):
            raise UserError("data.train: give every source a weight, or none (then each counts by its size)")
        self.shares = [s.size for s in sources] if weights[0] is None else weights
        if sum(self.shares) <= 0:
            raise UserError("data.train: the source weights sum to 0")
        for s in sources:
            if s.type == "wds" and len(s.shards) < world_size:
                raise UserError(f"WebDataset source {s.path}: {len(s.shards)} shard(s) for {world_size} ranks; "
                                "write at least one shard per rank")
        self.global_batch = batch_size * world_size
        if self.epoch_samples < self.global_batch:
            raise UserError(f"an epoch has {self.epoch_samples} images, fewer than one global batch "
                            f"({self.global_batch}); lower data.batch_size")
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Every rank has the same number; the last partial global batch is dropped."""
        return self.epoch_samples // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self) -> np.ndarray:
        sizes = [None if s.type == "wds" else s.size for s in self.sources]
        return epoch_plan(sizes, self.shares, self.epoch_samples, self.seed, self.epoch)

    def _wds_stream(self, source: Source):
        """This rank's endless stream of raw samples of one wds source (shards reshuffled every pass)."""
        import webdataset as wds

        shards = source.shards[self.rank::self.world_size]
        for rep in range(1 << 30):
            order = np.random.default_rng([self.seed, self.epoch, rep, 11]).permutation(len(shards))
            raw = wds.tarfile_samples([{"url": shards[i]} for i in order], handler=wds.warn_and_continue)
            yield from wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                   rng=random.Random(hash((self.seed, self.epoch, rep))))(raw)

    def _fetch(self, src_id: int, index: int, streams):
        """(path or bytes, label, where) of one plan position, not decoded yet (the transform decodes)."""
        source = self.sources[src_id]
        if source.type != "wds":
            path, label = source.samples[index]
            return path, label, path
        raw = next(streams[src_id])
        where = f"{raw.get('__url__', source.path)}:{raw.get('__key__', '?')}"
        key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
        label = int(raw["cls"]) if "cls" in raw else UNLABELED
        return (None if key is None else raw[key]), label, where

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan()
        streams = {i: self._wds_stream(s) for i, s in enumerate(self.sources) if s.type == "wds"}
        G, B = self.global_batch, self.batch_size
        for b in range(self.batches_per_epoch):
            lo = b * G + self.rank * B
            mine = b >= self.start_batch and (b - self.start_batch) % workers == worker
            for pos in range(lo, lo + B):
                src_id, index = int(plan[pos, 0]), int(plan[pos, 1])
                if not mine:
                    if src_id in streams:
                        next(streams[src_id])  # keep the stream aligned without decoding
                    continue
                data, label, where = self._fetch(src_id, index, streams)
                if data is None:
                    yield Skipped(where, f"{where}: no image ({'/'.join(WDS_IMAGE_KEYS)}) in the sample")
                    continue
                yield self.load_item(pos, data, label, where)

    def load_item(self, pos: int, data, label: int, where: str):
        """(image, label) of plan position `pos`, augmented under its own seed, or Skipped. The one place a
        position becomes pixels: distill.label_cache overrides it to record or replay the drawn crop."""
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed also queues lazy CUDA/XPU/MTIA seeding,
            # each formatting a stack trace, a quarter of the loader's time per image
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, pos))
            try:   # decoding and the crop in one go: a JPEG is decoded at the scale its crop needs
                return load_transformed(data, self.transform), label
            except UnreadableImage as e:
                return Skipped(where, str(e))


def stream_loader(stream: TrainStream, workers: int, device, collate):
    """The DataLoader over a training stream (whole per-rank batches from its workers). Its own generator:
    creating an epoch's iterator must not draw from the global RNG (dropout would differ on resume)."""
    return DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.device(device).type == "cuda", prefetch_factor=4 if workers else None,
                      generator=torch.Generator())


def build_sources(cfg_sources, root=None) -> list[Source]:
    """Build and validate every configured source up front (before any model is built)."""
    if not cfg_sources:
        raise UserError("data.train is empty: give at least one source, e.g. "
                        "[{type: folder, path: data/train}]")
    return [build_source(dict(s), root) for s in cfg_sources]
