"""The pool: a folder, a list file or WebDataset shards, read in fixed-size shards.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS

from distill.data import UNLABELED, WDS_IMAGE_KEYS, list_source, wds_source
from distill.core.images import ListDataset, Skipped, UnreadableImage, collate_skipping, load_transformed
from distill.core.errors import UserError
from distill.core.image_folder import images_under

WDS_ID_BITS = 32                        # a WebDataset image's id: shard << 32 | position in the shard


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
                item = load_transformed(data, transform)  # reduced-size JPEG decoding where it can
            except (UnreadableImage, ValueError) as e:
                item = Skipped(name, str(e))
            yield (shard << WDS_ID_BITS) | pos, name, item, data if raw else None


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
        files = images_under(path)
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





def relative_to(path: str, folder: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))




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

