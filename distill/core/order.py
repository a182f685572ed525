"""Deterministic data order for map-style datasets: resumable at any batch, independent of workers.

Epoch e is a permutation drawn from (seed, e) alone, cut into global batches; rank r takes its slice of
each, so the ranks together see the single-process batch. Each position carries its own augmentation
seed, so the pixels do not depend on which worker decodes them or on where a run was resumed.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of one position in one epoch: independent of worker, rank and resume point."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


class EpochBatches(Sampler):
    """This rank's batches of one epoch from `start`: lists of (epoch, position, index); the last partial
    global batch is dropped, so every rank runs the same number of steps."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.batches_per_epoch - self.start

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch, 5]).permutation(self.size)
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.batches_per_epoch):
            lo = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, pos, int(perm[pos])) for pos in range(lo, lo + self.batch_size)]


class Seeded(Dataset):
    """Item (epoch, position, index) of `dataset`, with torch's RNG seeded for that position while it loads."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, position, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, position))
            return self.dataset[index]


def resumable_loader(dataset, batch_size: int, seed: int, rank: int, world_size: int, workers: int,
                     collate_fn, pin_memory: bool = False) -> DataLoader:
    """A training DataLoader in the order above; `loader.batch_sampler.set_epoch(e, start)` before each epoch.

    It has its own generator, so creating an iterator never draws from the global RNG (which would shift
    dropout masks after a resume)."""
    sampler = EpochBatches(len(dataset), batch_size, seed, rank, world_size)
    return DataLoader(Seeded(dataset, seed), batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False)
