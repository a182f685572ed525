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

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS

from .artifact import IMAGENET_MEAN, IMAGENET_STD
from .atomic import atomic_write
from .checkpoint import load_checkpoint, save_checkpoint
from .data import (UNLABELED, WDS_IMAGE_KEYS, ListDataset, Skipped, UnreadableImage, build_transform,
                   collate_skipping, folder_source, list_source, load_rgb, wds_source)
from .distributed import barrier, cleanup, init_distributed, is_distributed
from .errors import UserError, run_cli
from .precision import AMP_DTYPES, autocast
from .teacher import Teacher, load_teacher_model

NO_ID = torch.iinfo(torch.int64).max    # an empty top-k slot: sorts after every real image
ASSIGN_MODES = ("all", "top1")
WDS_ID_BITS = 32                        # a WebDataset image's id: shard << 32 | position in the shard


# ---------------------------------------------------------------------------------------------------
# The per-class top-k.

class TopKPerClass:
    """For every class, the k best (score, id) pairs absorbed so far: score descending, then id ascending.

    The order is total and ids are unique, so absorbing candidates in any grouping (batch by batch, shard
    by shard, rank by rank) gives the same result as sorting everything at once. Memory: classes x k.
    """

    def __init__(self, num_classes: int, k: int, device="cpu"):
        self.k = k
        self.scores = torch.full((num_classes, k), -math.inf, device=device)
        self.ids = torch.full((num_classes, k), NO_ID, dtype=torch.int64, device=device)

    def add_batch(self, probs: torch.Tensor, ids: torch.Tensor, top1_only: bool = False) -> None:
        """probs (B, classes), ids (B,). top1_only: an image competes only for its highest class."""
        scores = probs.detach().float().to(self.scores.device).T.contiguous()
        ids = ids.to(self.ids.device).view(1, -1).expand_as(scores)
        if top1_only:
            other = torch.ones_like(scores, dtype=torch.bool)
            other[scores.argmax(0), torch.arange(scores.shape[1])] = False
            scores, ids = scores.masked_fill(other, -math.inf), ids.masked_fill(other, NO_ID)
        self.absorb(scores, ids)

    def absorb(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Candidates as (classes, M) score and id matrices (another TopKPerClass's tensors, for a merge)."""
        scores, ids = scores.to(self.scores.device), ids.to(self.ids.device)
        kth_score, kth_id = self.scores[:, -1:], self.ids[:, -1:]
        better = (scores > kth_score) | ((scores == kth_score) & (ids < kth_id))
        rows = better.any(1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        s = torch.cat([self.scores[rows], scores[rows]], 1)
        i = torch.cat([self.ids[rows], ids[rows]], 1)
        by_id = i.sort(dim=1, stable=True).indices            # ties: pool order ...
        s, i = s.gather(1, by_id), i.gather(1, by_id)
        best = s.sort(dim=1, descending=True, stable=True).indices[:, :self.k]  # ... under score descending
        self.scores[rows], self.ids[rows] = s.gather(1, best), i.gather(1, best)

    def state_dict(self) -> dict:
        return {"scores": self.scores.cpu().clone(), "ids": self.ids.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["scores"].to(self.scores.device).clone()
        self.ids = state["ids"].to(self.ids.device).clone()

    def entries(self):
        """(class, id, score) for every filled slot, class by class, best first."""
        for c, (scores, ids) in enumerate(zip(self.scores.tolist(), self.ids.tolist())):
            for s, i in zip(scores, ids):
                if i != NO_ID:
                    yield c, i, s


# ---------------------------------------------------------------------------------------------------
# The pool: images cut into shards.

@dataclass
class Pool:
    """Files (a folder or a list file) in fixed-size chunks, or WebDataset tars (one shard each).

    An image's id is its position in pool order: the index in the file listing, or shard << 32 | position
    in the tar. Ids only grow along the pool, which makes "smaller id" mean "earlier in the pool".
    """
    spec: str
    kind: str                                       # files | wds
    samples: list = field(default_factory=list)     # files: [(path, label)] in pool order
    urls: list = field(default_factory=list)        # wds: tar files in pool order
    shard_size: int = 4096

    @property
    def num_shards(self) -> int:
        return -(-len(self.samples) // self.shard_size) if self.kind == "files" else len(self.urls)

    @property
    def size(self) -> int | None:
        return len(self.samples) if self.kind == "files" else None

    def describe(self) -> str:
        if self.kind == "files":
            return f"{self.spec} ({len(self.samples)} images in {self.num_shards} shards of {self.shard_size})"
        return f"{self.spec} ({len(self.urls)} WebDataset shards)"

    def shards_of_rank(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_shards, world_size))

    def shard_of(self, image_id: int) -> int:
        return image_id // self.shard_size if self.kind == "files" else image_id >> WDS_ID_BITS

    def items(self, shard: int, transform, exclude=frozenset(), raw: bool = False):
        """(id, name, tensor or Skipped, raw) for one shard, in pool order. raw: the file path or bytes."""
        if self.kind == "files":
            lo = shard * self.shard_size
            chunk = self.samples[lo:lo + self.shard_size]
            dataset = ListDataset([(path, lo + j) for j, (path, _) in enumerate(chunk)], transform)
            for j, (path, _) in enumerate(chunk):
                if path in exclude:
                    continue
                item = dataset[j]
                yield lo + j, path, item if isinstance(item, Skipped) else item[0], path
            return
        import webdataset as wds

        url = self.urls[shard]
        for pos, sample in enumerate(wds.tarfile_samples([{"url": url}], handler=wds.warn_and_continue)):
            name = f"{url}#{sample.get('__key__', pos)}"
            if name in exclude:
                continue
            key = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
            data = sample.get(key)
            try:
                if key is None:
                    raise UnreadableImage(f"{name}: no image ({'/'.join(WDS_IMAGE_KEYS)}) in the sample")
                item = transform(load_rgb(data))
            except (UnreadableImage, ValueError) as e:
                item = Skipped(name, str(e))
            yield (shard << WDS_ID_BITS) | pos, name, item, data if raw else None


def image_files(root: Path) -> list[str]:
    """Every image under `root`, any depth, in sorted path order (a pool folder needs no class folders)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    return found


def open_pool(spec, shard_size: int = 4096, what: str = "pool") -> Pool:
    """A folder, a list file or WebDataset shards; a UserError naming the path when it is none of them."""
    spec = str(spec)
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if ".tar" in spec:
        # data.wds_source counts the samples unless given a size (one full read of the pool): mining reads
        # each shard once anyway, so pass a placeholder size and use only the resolved shard list.
        return Pool(spec, "wds", urls=[os.path.abspath(u) for u in wds_source(spec, size=-1).shards])
    path = Path(spec)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise UserError(f"{what} folder {path} holds no images (extensions {', '.join(IMG_EXTENSIONS)})")
        return Pool(spec, "files", samples=[(f, UNLABELED) for f in files], shard_size=shard_size)
    if path.is_file():
        return Pool(spec, "files", samples=list_source(path).samples, shard_size=shard_size)
    raise UserError(f"{what} not found: {spec} (expected a folder of images, a list file of 'relpath [label]' "
                    "lines, or WebDataset shards such as pool/shard-{000..099}.tar)")


def _as_is(batch):
    return batch


class ShardBatches(IterableDataset):
    """Batches that never cross a shard, each a dict with shard, last (the shard's final batch), images,
    ids, names, skipped and raws. DataLoader workers take whole shards, so a batch is the same whatever the
    number of workers or ranks (eval-mode scores are then bit-identical), and when a shard's last batch
    arrives, all of that shard has arrived."""

    def __init__(self, pool: Pool, shards, transform, batch_size: int, exclude=frozenset(), raw: bool = False):
        self.pool, self.shards, self.transform = pool, list(shards), transform
        self.batch_size, self.exclude, self.raw = batch_size, exclude, raw

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard in self.shards[worker::workers]:
            batch = []
            for item in self.pool.items(shard, self.transform, self.exclude, self.raw):
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._pack(shard, batch, last=False)
                    batch = []
            yield self._pack(shard, batch, last=True)   # possibly empty: it marks the shard finished

    @staticmethod
    def _pack(shard, batch, last):
        good = [b for b in batch if not isinstance(b[2], Skipped)]
        images, ids, _ = collate_skipping([(b[2], b[0]) for b in good])
        return dict(shard=shard, last=last, images=images, ids=ids, names=[b[1] for b in good],
                    raws=[b[3] for b in good], skipped=[b[2] for b in batch if isinstance(b[2], Skipped)])


def shard_loader(pool, shards, transform, batch_size, workers, exclude=frozenset(), raw=False, pin=False):
    return DataLoader(ShardBatches(pool, shards, transform, batch_size, exclude, raw), batch_size=None,
                      num_workers=min(workers, len(shards)), collate_fn=_as_is, pin_memory=pin)


# ---------------------------------------------------------------------------------------------------
# The teacher and its preprocessing.

def load_mining_teacher(sources, num_classes: int = 1000, input_size: int | None = None,
                        pretrained: bool = False):
    """(Teacher in eval mode, eval transform, classes, first model). Eval-mode BatchNorm: an image's score
    does not depend on its batch mates. The transform is the first teacher's test preprocessing."""
    models, metas = [], []
    torch.manual_seed(0)  # a random-init timm: teacher (tests, benchmarks) is then the same on every rank
    for source in sources:
        model, meta = load_teacher_model(source, num_classes, pretrained=pretrained)
        models.append(model)
        metas.append(meta)
    classes = {m["num_classes"] for m in metas}
    if len(classes) > 1:
        raise UserError(f"the teachers {', '.join(sources)} predict different class counts {sorted(classes)}")
    prep = metas[0].get("preprocessing", {})
    size = input_size or int(prep.get("input_size", 224))
    mean, std = prep.get("mean", IMAGENET_MEAN), prep.get("std", IMAGENET_STD)
    transform = build_transform("test", size, mean, std, float(prep.get("crop_pct", 0.875)),
                                interpolation=prep.get("interpolation", "bilinear"))
    teacher = Teacher(models, metas, bn="eval", student_mean=mean, student_std=std)
    return teacher, transform, classes.pop(), models[0]


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
              exclude=frozenset(), amp: str = "none", progress: bool = True) -> dict:
    """Mine this rank's shards, resuming from state_path; returns the rank's top-k, names and counts."""
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
    bar = None
    if progress and dist.is_main and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="mine", unit="shard", dynamic_ncols=True, file=sys.stderr)
    computed, t0, images_now, warned = [], time.perf_counter(), 0, 0
    loader = shard_loader(pool, todo, transform, batch_size, workers, exclude, pin=dist.device.type == "cuda")
    for batch in loader:
        for s in batch["skipped"][:max(0, 5 - warned)]:
            print(f"warning: skipped unreadable image {s.reason}", file=sys.stderr)
        warned += len(batch["skipped"])
        counts["skipped"] += len(batch["skipped"])
        if len(batch["ids"]):
            with torch.no_grad(), autocast(dist.device.type, AMP_DTYPES[amp]):
                probs = teacher(batch["images"].to(dist.device, non_blocking=True))
            topk.add_batch(probs, batch["ids"], top1_only=assign == "top1")
            counts["images"] += len(batch["ids"])
            images_now += len(batch["ids"])
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
            if bar is not None:
                bar.update(1)
                bar.set_postfix(img_s=f"{images_now / max(time.perf_counter() - t0, 1e-9):.0f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    return dict(topk=topk.state_dict(), names=names, counts=counts, computed=computed,
                resumed=len(mine) - len(todo), images_now=images_now, seconds=seconds,
                peak_rss_mb=peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports KiB), DataLoader workers not included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather(obj) -> list:
    """Every rank's object, in rank order (just [obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def merge_ranks(parts: list[dict], num_classes: int, k: int) -> tuple[TopKPerClass, dict]:
    total = TopKPerClass(num_classes, k)
    names = {}
    for part in parts:
        total.absorb(part["topk"]["scores"], part["topk"]["ids"])
        names.update(part["names"])
    return total, names


# ---------------------------------------------------------------------------------------------------
# Outputs.

def relative_to(path: str, folder: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


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


def read_exclude(path) -> frozenset:
    """Names to leave out of the pool: the first tab-separated column of a dedup removed list."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--exclude {path}: file not found (expected the removed list written by dedup)")
    names = set()
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            names.add(line.split("\t")[0])
    return frozenset(names)


def normalized_exclude(pool: Pool, names: frozenset) -> frozenset:
    """Match exclusions the way the pool names its images (absolute file paths stay as the pool wrote them)."""
    if pool.kind == "wds" or not names:
        return names
    wanted = {os.path.abspath(n) for n in names}
    return frozenset(p for p, _ in pool.samples if os.path.abspath(p) in wanted)


# ---------------------------------------------------------------------------------------------------
# CLI.

def add_teacher_args(parser):
    parser.add_argument("--teacher", action="append", required=True, metavar="NAME",
                        help="artifact name/path, trainer checkpoint, zoo name or timm:ARCH (repeat: ensemble)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of a timm:/zoo teacher")
    parser.add_argument("--pretrained", action="store_true", help="timm weights for timm: teachers (network)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="teacher resolution (default: the teacher's preprocessing input_size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--shard-size", type=int, default=4096,
                        help="images per shard of a folder/list pool (a WebDataset tar is one shard)")


def parse_mine_args(argv):
    parser = argparse.ArgumentParser(prog="python -m distill.mine", description=__doc__.splitlines()[0],
                                     epilog="subcommands: dedup (near-duplicates of the eval set), bench")
    add_teacher_args(parser)
    parser.add_argument("--pool", required=True, help="folder, list file or WebDataset shards")
    parser.add_argument("--k", type=int, required=True, help="images kept per class")
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
    args = parser.parse_args(argv)
    for name in ("k", "batch_size", "num_classes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    return args


def stem_path(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def main_mine(argv=None):
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
                           input_size=args.input_size, num_classes=num_classes, amp=args.amp,
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


# ---------------------------------------------------------------------------------------------------
# bench: peak RSS and throughput for pools 10x apart, each in a fresh process.

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


def main_bench(argv=None):
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


SUBCOMMANDS = {"mine": main_mine, "bench": main_bench}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in (*SUBCOMMANDS, "dedup") else "mine"
    if command == "dedup":
        from .dedup import main as main_dedup  # dedup imports this module: keep the import local
        return main_dedup(argv)
    return SUBCOMMANDS[command](argv)


if __name__ == "__main__":
    run_cli(main)
