"""The trainer kit: what distill.ssld, transfer.finetune and detection.train share around the engine.

Every trainer takes the same five steps, under the same names:

    parse(argv) -> args      the CLI: `add_trainer_args` (-c, -o, --out-dir, --restart) + its own flags
    load(args) -> Config     defaults <- recipe <- flags <- -o overrides (`distill.core.config.load_config`)
    check(cfg) -> Config     `check_run` + `check_sections` + the trainer's own rules (one-line errors)
    build -> Task            the trainer's Task, built from (cfg, dist, its checked data): model, optimizer,
                             scheduler, loaders (`distill.core.engine.Task`)
    run(...)                 `Engine(task, cfg, dist).run()`, then the trainer's own outputs

One `Config` (`distill.core.config.Config`) goes from load to the engine. This module holds the shared
`run` block with its checks, and the builders more than one trainer needs; a trainer's file keeps only its
schema, its task and its CLI.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch.utils.data import DataLoader, Subset

from .config import ConfigError
from .distributed import DistInfo
from .images import collate_skipping
from .precision import check_amp
from .schedule import build_scheduler

# The `run` block every trainer's schema shares (a trainer may change a default, never the meaning).
RUN_DEFAULTS = dict(
    out_dir="runs/run",
    seed=0,
    device="auto",            # auto (cuda when present) | cpu | cuda
    amp="off",                # off | bf16 | fp16 (a GradScaler only for fp16)
    channels_last=False,
    compile=False,            # torch.compile the model
    workers=None,             # DataLoader processes per rank; null: what the machine has (`default_workers`)
    log_period=10,            # iterations between log rows (and non-finite checks)
    eval_period=0,            # iterations between evaluations (0: none mid-epoch); see Task.eval_every_epochs
    checkpoint_period=0,      # iterations between checkpoints; 0 = at the end of every epoch only
    checkpoint_minutes=10.0,  # also checkpoint when this much time passed (0 = off)
    progress=True,
)
RUN_RANGES = {"workers": (0, None), "log_period": (1, None), "eval_period": (0, None),
              "checkpoint_period": (0, None), "checkpoint_minutes": (0, None)}
DEVICES = ("auto", "cpu", "cuda")
# `run` keys that may change between a run and its resume in every trainer (they take effect): periods,
# the progress bar, the loader's processes, and the precision (fp16 -> bf16 is the non-finite advice;
# the GradScaler's state is dropped or started as the new setting needs). A trainer adds its own keys.
RUN_SAFE_ON_RESUME = ("run.log_period", "run.progress", "run.eval_period", "run.checkpoint_period",
                      "run.checkpoint_minutes", "run.workers", "run.amp")


# ---------------------------------------------------------------------------------------------------
# check: one-line errors for what a type check cannot catch.

def check_ranges(section: Mapping, ranges: dict, prefix: str) -> None:
    """Numbers outside their range: {key: (low, high)}, None = unbounded; lists are checked item by item."""
    for key, (low, high) in ranges.items():
        value = section[key]
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or (low is not None and v < low) or \
                    (high is not None and v > high):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ConfigError(f"{prefix}{key}={value!r}: expected a number {bounds}")


def check_sections(cfg: Mapping, ranges: dict) -> None:
    """`check_ranges` for every section of a trainer's RANGES table ({section: {key: (low, high)}})."""
    for section, table in ranges.items():
        check_ranges(cfg[section], table, f"{section}.")


def check_choice(value, key: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}; expected one of {', '.join(map(str, allowed))}")


def check_crop_scale(value, key: str = "data.crop_scale") -> None:
    """RandomResizedCrop's area range: [low, high] with 0 <= low <= high <= 1 (None: the trainer's default)."""
    if value is None:
        return
    if not isinstance(value, list) or len(value) != 2 or value[0] > value[1]:
        raise ConfigError(f"{key}={value!r}: expected [low, high] with 0 <= low <= high <= 1")
    check_ranges({key: value}, {key: (0.0, 1.0)}, "")


def check_run(cfg) -> None:
    """The shared `run` block: ranges, the precision's canonical name, the device, the workers default."""
    run = cfg.run
    check_ranges(run, RUN_RANGES, "run.")
    run.amp = check_amp(run.amp)
    check_choice(run.device, "run.device", DEVICES)
    if run.workers is None:
        run.workers = default_workers()


def default_workers() -> int:
    """DataLoader processes per rank when run.workers is not set: the cores this process may use, less one
    for the training process itself, at most 8 (more rarely helps one GPU's input pipeline)."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


# ---------------------------------------------------------------------------------------------------
# build: seeds, schedules, evaluation loaders.

def seed_for_build(seed: int) -> None:
    """The seeding policy, part 1 (before building): the same seed on every rank, so every rank builds the
    same initial weights (DDP also broadcasts rank 0's) and draws the same data plans, which the samplers
    then cut per rank (distill.data.TrainStream, distill.core.order, detection's TrainSampler)."""
    torch.manual_seed(seed)


def seed_for_training(seed: int, dist: DistInfo) -> None:
    """The seeding policy, part 2 (after building): rank 0 continues the build's stream, so one process
    runs exactly as before; every other rank reseeds with seed + rank, so the randomness drawn inside a
    step (dropout, drop-path, mixup's Beta, the detector's RPN/RoI sampling) differs between ranks instead
    of repeating rank 0's draws on other images. Resume restores each rank's own stream."""
    if dist.rank:
        torch.manual_seed(seed + dist.rank)


def lr_scheduler(optimizer, schedule: Mapping, steps_per_epoch: int = 1):
    """The warmup + cosine/step schedule of a `schedule` block, stepped once per batch.

    Epoch-based blocks (`epochs`, `warmup_epochs`, `milestones` in epochs) are converted to steps with
    `steps_per_epoch`; iteration-based ones (`iterations`, `warmup_iters`, `steps`) are used as they are.
    """
    s = schedule
    if "iterations" in s:
        return build_scheduler(optimizer, s.get("kind", "step"), total_steps=s["iterations"],
                               warmup_steps=s["warmup_iters"], milestones=s["steps"], gamma=s["gamma"],
                               warmup_factor=s["warmup_factor"], min_factor=s.get("min_factor", 0.0))
    return build_scheduler(optimizer, s["kind"], total_steps=s["epochs"] * steps_per_epoch,
                           warmup_steps=int(round(s["warmup_epochs"] * steps_per_epoch)),
                           milestones=[int(m * steps_per_epoch) for m in s["milestones"]], gamma=s["gamma"],
                           warmup_factor=s["warmup_factor"], min_factor=s["min_factor"])


def sharded_eval_loader(dataset, batch_per_rank: int, workers: int, dist: DistInfo,
                        collate=collate_skipping) -> DataLoader:
    """Each rank a disjoint stride of the data (no padding), so summed counts cover every image once."""
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(shard, batch_size=max(batch_per_rank, 1), shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=dist.device.type == "cuda", generator=torch.Generator())
