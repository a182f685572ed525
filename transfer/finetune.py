"""Fine-tune a student artifact (or a timm model) on a transfer dataset, and report it at two resolutions.

    python -m transfer.finetune --dataset flowers102 --backbone r50_vd_ssld
    python -m transfer.finetune --dataset demo --backbone timm:resnet18d --fix
    torchrun --nproc-per-node 8 -m transfer.finetune --dataset sun397 --backbone r50_vd_ssld

Per-stage lr multipliers and weight decay default to the artifact's recommended.transfer and
pretrain.weight_decay ("matched decay"); preprocessing comes from the artifact. Accuracy is always
reported at the train resolution and at a higher test resolution (FixRes); --fix then fine-tunes only
the classifier at the test resolution with the test preprocessing (optionally re-estimating BatchNorm
statistics). The run folder holds checkpoint.pt (atomic, exact resume: run the same command again),
metrics.csv/.png, results.json and the fine-tuned model as a student artifact (model.safetensors, and
model_fix.safetensors after --fix).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from distill.students.artifact import default_test_size, load_student, save_student
from distill.core.atomic import atomic_write
from distill.core.checkpoint import load_checkpoint, save_checkpoint
from distill.core.config import Config, add_config_args, load_config, merge, read_yaml, validate
from distill.core.images import build_transform, collate_skipping
from distill.core.distributed import DistInfo, barrier, cleanup, init_distributed
from distill.core.errors import UserError, run_cli
from distill.losses import hard_ce_loss
from distill.core.metrics import evaluate_classifier
from distill.core.precision import AMP_DTYPES, autocast
from distill.core.runlog import RunLog, plot_metrics
from distill.core.schedule import build_scheduler
from distill.students.stages import parse_multipliers, stage_param_groups

from .datasets import Split, TransferData, dataset_names, load_dataset

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "transfer"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
# Keys that may change between a run and its resume without changing the result.
RESUME_FREE_KEYS = {"out", "data.workers", "data.root", "train.progress", "train.eval_batch_size", "device"}


# ---------------------------------------------------------------------------------------------------
# Config: YAML recipe <- -o overrides <- command-line flags

FLAGS = [  # (flag, config key, type, help)
    ("--dataset", "dataset", str, f"one of {dataset_names()}"),
    ("--backbone", "backbone", str, "student artifact name or path, or timm:ARCH"),
    ("--out", "out", str, "run folder (default runs/transfer/<dataset>/<backbone>)"),
    ("--data-root", "data.root", str, "dataset root (default $SSLD_DATA or ./data)"),
    ("--split", "data.split", str, "final (fit train+val, report test) or select (fit train, report val)"),
    ("--lr", "optim.lr", float, "base learning rate (the classifier's)"),
    ("--lr-mult", "optim.lr_mult", str, "5 per-stage multipliers, e.g. 0.1,0.1,0.2,0.2,0.3 "
                                        "(default: the artifact's recommended.transfer)"),
    ("--weight-decay", "optim.weight_decay", float, "default: the artifact's pretrain.weight_decay (matched decay)"),
    ("--epochs", "schedule.epochs", int, "fine-tuning epochs (0: only --fix)"),
    ("--batch-size", "train.batch_size", int, "global batch size"),
    ("--image-size", "data.image_size", int, "train resolution (default: the artifact's)"),
    ("--test-size", "data.test_size", int, "higher test resolution (default about 1.15x the train size)"),
    ("--label-smoothing", "train.label_smoothing", float, "label smoothing epsilon"),
    ("--mixup", "train.mixup", float, "mixup alpha (0: off)"),
    ("--amp", "train.amp", str, "auto | bf16 | fp16 | off"),
    ("--workers", "data.workers", int, "data loader processes"),
    ("--fix-epochs", "fix.epochs", int, "epochs of the Fix stage"),
    ("--fix-lr", "fix.lr", float, "learning rate of the Fix stage"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--seed", "seed", int, "random seed"),
]
SWITCHES = [  # (flag, config key, value, help)
    ("--download", "data.download", True, "let torchvision download the dataset into the data root"),
    ("--channels-last", "train.channels_last", True, "channels_last memory format"),
    ("--fix", "fix.enabled", True, "then fine-tune the classifier at the test resolution (FixRes)"),
    ("--fix-bn", "fix.bn_stats", True, "with --fix: also re-estimate BatchNorm statistics"),
    ("--pretrained", "pretrained", True, "timm:ARCH only: start from timm's pretrained weights"),
    ("--no-progress", "train.progress", False, "no progress bar"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    for flag, key, typ, text in FLAGS:
        parser.add_argument(flag, dest=key, type=typ, default=None, help=text,
                            metavar=flag[2:].upper().replace("-", "_"))
    for flag, key, value, text in SWITCHES:
        parser.add_argument(flag, dest=key, action="store_const", const=value, default=None, help=text)
    parser.add_argument("--restart", action="store_true", help="discard a checkpoint in the run folder")


def _nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def build_config(args: argparse.Namespace) -> Config:
    """The recipe (--config, else configs/transfer/<dataset>.yaml, else base.yaml), -o overrides, flags."""
    flag_keys = {key for _, key, *_ in FLAGS + SWITCHES}
    flags = {k: v for k, v in vars(args).items() if k in flag_keys and v is not None}
    path = args.config
    if path is None:
        dataset = flags.get("dataset") or ""
        candidate = CONFIG_DIR / f"{dataset}.yaml"
        path = candidate if dataset and "/" not in dataset and candidate.is_file() else BASE_CONFIG
    cfg = load_config(path, args.override, defaults=BASE_CONFIG)
    flags = _nest(flags)
    validate(flags, read_yaml(BASE_CONFIG), "command-line flags")
    return check_config(Config.wrap(merge(cfg, flags)))


def check_config(cfg: Config) -> Config:
    if not cfg.dataset:
        raise UserError(f"no dataset: pass --dataset ({dataset_names()})")
    if not cfg.backbone:
        raise UserError("no backbone: pass --backbone NAME|PATH|timm:ARCH (e.g. timm:resnet18d)")
    choices = {"data.split": ("final", "select"), "train.amp": ("auto", "bf16", "fp16", "off"),
               "schedule.kind": ("cosine", "step"), "device": ("auto", "cpu", "cuda")}
    for key, allowed in choices.items():
        section, _, name = key.rpartition(".")
        value = (cfg[section] if section else cfg)[name]
        if value not in allowed:
            raise UserError(f"{key}={value!r}; expected one of {', '.join(allowed)}")
    if cfg.train.batch_size < 1:
        raise UserError(f"train.batch_size={cfg.train.batch_size}: needs at least 1")
    if cfg.fix.enabled and cfg.fix.epochs < 1:
        raise UserError(f"fix.epochs={cfg.fix.epochs}: needs at least 1 with --fix")
    if cfg.schedule.epochs < 0 or (cfg.schedule.epochs == 0 and not cfg.fix.enabled):
        raise UserError(f"schedule.epochs={cfg.schedule.epochs}: needs at least 1 (0 only with --fix)")
    if not 0 < cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction={cfg.data.val_fraction}: expected a fraction in (0, 1)")
    if cfg.optim.lr_mult is not None:
        parse_multipliers(cfg.optim.lr_mult)
    return cfg


def backbone_label(backbone: str) -> str:
    if backbone.startswith("timm:"):
        return "timm-" + backbone[len("timm:"):]
    return Path(backbone).stem or backbone


def dataset_label(dataset: str) -> str:
    """A folder name for a dataset: flowers102, or folder-NAME for folder:PATH/NAME."""
    return "folder-" + Path(dataset[len("folder:"):]).name if dataset.startswith("folder:") else dataset


def default_out(cfg) -> Path:
    return Path("runs") / "transfer" / dataset_label(cfg.dataset) / (
        backbone_label(cfg.backbone) + ("_select" if cfg.data.split == "select" else ""))


# ---------------------------------------------------------------------------------------------------
# Build: data, model, resolved hyper-parameters, optimizer. No training here.

def transform(kind: str, prep: dict, size: int, crop_scale=(0.08, 1.0)):
    """The artifact's preprocessing at `size`: `random_crop` (+ flip) to train, `test` (resize to
    size / crop_pct, centre crop) to evaluate and for the Fix stage."""
    return build_transform(kind, size, prep["mean"], prep["std"], crop_pct=prep["crop_pct"], scale=crop_scale,
                           interpolation=prep.get("interpolation", "bilinear"))


@dataclass
class Resolved:
    """What the run uses after the artifact filled in the defaults, with where each value came from."""
    lr_mult: list
    weight_decay: float
    image_size: int
    test_size: int
    family: str
    sources: dict

    def describe(self) -> str:
        return "; ".join(f"{k} {v}" for k, v in self.sources.items())


def resolve_defaults(cfg, meta: dict) -> Resolved:
    sources = {}
    family = meta.get("stages", {}).get("family", "generic")
    if cfg.optim.lr_mult is not None:
        mults = parse_multipliers(cfg.optim.lr_mult, family)
        sources["lr_mult"] = f"{_fmt(mults)} (given)"
    else:
        mults = parse_multipliers(meta.get("recommended", {}).get("transfer") or [1.0] * 5, family)
        sources["lr_mult"] = f"{_fmt(mults)} (the artifact's recommended.transfer)"
    if cfg.optim.weight_decay is not None:
        wd, why = float(cfg.optim.weight_decay), "given"
    elif (meta.get("pretrain") or {}).get("weight_decay") is not None:
        wd, why = float(meta["pretrain"]["weight_decay"]), "matched to the artifact's pretrain.weight_decay"
    else:
        wd = float(cfg.optim.default_weight_decay)
        why = "optim.default_weight_decay: the artifact records no pretrain.weight_decay"
    sources["weight_decay"] = f"{wd:g} ({why})"
    prep = meta["preprocessing"]
    size = cfg.data.image_size or int(prep["input_size"])
    if cfg.data.test_size:
        test = cfg.data.test_size
    elif size == int(prep["input_size"]) and prep.get("test_input_size"):
        test = int(prep["test_input_size"])
    else:
        test = default_test_size(size)
    sources["resolution"] = f"train {size} px, test {test} px"
    return Resolved(mults, wd, size, test, family, sources)


def _fmt(mults) -> str:
    return ",".join(f"{m:g}" for m in mults)


def amp_dtype(cfg, device: torch.device):
    kind = cfg.train.amp
    if kind == "auto":
        kind = "bf16" if device.type == "cuda" else "off"
    return AMP_DTYPES[kind]


def param_groups(model: nn.Module, cfg, res: Resolved, phase: str) -> list[dict]:
    """finetune: per-stage groups (distill.students.stages). fix: the classifier only, everything else frozen."""
    if phase == "finetune":
        return stage_param_groups(model, res.lr_mult, cfg.optim.lr, res.weight_decay,
                                  head_mult=cfg.optim.head_mult, family=res.family)
    model.requires_grad_(False)
    head = list(model.get_classifier().parameters())
    for p in head:
        p.requires_grad_(True)
    return [dict(params=head, lr=cfg.fix.lr, lr_mult=1.0, weight_decay=res.weight_decay, name="head")]


def set_train_mode(model: nn.Module, phase: str, bn_stats: bool) -> None:
    """finetune: everything in train mode. fix: eval mode (frozen BN statistics, no dropout), except
    BatchNorm layers when their statistics are re-estimated."""
    model.train(phase == "finetune")
    if phase == "fix" and bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def make_loader(dataset, batch_size: int, workers: int, dist: DistInfo, *, train: bool, seed: int = 0):
    """Train: a DistributedSampler (reseeded per epoch with set_epoch), whole batches. Eval: each rank a
    disjoint stride of the data, so the reduced metric counts every image exactly once."""
    if train:
        sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                          collate_fn=collate_skipping, pin_memory=dist.device.type == "cuda")
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(shard, batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skipping,
                      pin_memory=dist.device.type == "cuda")


def per_rank_batch(batch_size: int, n_train: int, dist: DistInfo, name: str) -> int:
    if batch_size % dist.world_size:
        raise UserError(f"{name}={batch_size} is not divisible by the {dist.world_size} processes")
    per_rank = batch_size // dist.world_size
    fit = n_train // dist.world_size
    if per_rank > fit:
        if dist.is_main:
            print(f"note: {name} {batch_size} is larger than the {n_train} training images; using {fit * dist.world_size}")
        per_rank = max(fit, 1)
    return per_rank


# ---------------------------------------------------------------------------------------------------
# Run: one epoch, top to bottom.

class Diverged(UserError):
    pass


def mix_batch(images, labels, alpha: float):
    """Mixup with the batch rolled by one, lam ~ Beta(alpha, alpha) from the torch RNG (seeded per epoch)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return lam * images + (1 - lam) * images.roll(1, 0), (lam, labels.roll(1, 0))


def train_one_epoch(model, loader, optimizer, scheduler, *, device, amp, scaler, label_smoothing: float,
                    mixup: float, channels_last: bool, progress) -> tuple[float, int, list]:
    """Returns (mean loss, images seen on this rank, unreadable images skipped)."""
    total, seen, skipped = 0.0, 0, []
    for images, labels, bad in progress(loader):
        skipped += bad
        if len(labels) < 2:  # everything unreadable (BatchNorm cannot train on one image either)
            continue
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mix = None
        if mixup > 0:
            images, mix = mix_batch(images, labels, mixup)
        with autocast(device.type, amp):
            logits = model(images)
        loss = hard_ce_loss(logits, labels, mix, label_smoothing)
        value = loss.item()  # the one host sync per step
        if not math.isfinite(value):
            raise Diverged(f"the loss is {value}: training diverged; lower the learning rate "
                           f"(the classifier's is {optimizer.param_groups[-1]['lr']:.3g} at this step)")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total += value * len(labels)
        seen += len(labels)
        if hasattr(progress, "postfix"):
            progress.postfix(loss=value, lr=optimizer.param_groups[-1]["lr"])
    return total / max(seen, 1), seen, skipped


class Progress:
    """tqdm around a loader on the main process, silent elsewhere."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __call__(self, loader):
        if not self.enabled:
            return loader
        from tqdm import tqdm
        self.bar = tqdm(loader, desc=self.desc, leave=False, dynamic_ncols=True)
        return self.bar

    def postfix(self, **values):
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)


def evaluate(model, dataset, size: int, prep: dict, cfg, dist: DistInfo, num_classes: int, amp) -> dict:
    batch = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    loader = make_loader(dataset.with_transform(transform("test", prep, size)), max(batch // dist.world_size, 1),
                         cfg.data.workers, dist, train=False)
    if cfg.train.channels_last:
        loader = ((x.contiguous(memory_format=torch.channels_last), y) for x, y in loader)
    return evaluate_classifier(model, loader, dist.device, num_classes, amp)


# ---------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, phase: str, epoch: int) -> int:
    """Augmentation, mixup and loader-worker randomness of one epoch on one rank. Drawn from these four
    alone, so a run resumed at an epoch boundary repeats it exactly on every rank (no RNG state to save)."""
    return int(np.random.SeedSequence([seed, rank, ("finetune", "fix").index(phase), epoch]).generate_state(1)[0])


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(saved: dict, current: dict, out: Path) -> None:
    a, b = _flat(saved), _flat(current)
    differ = sorted(k for k in set(a) | set(b) if k not in RESUME_FREE_KEYS and a.get(k) != b.get(k))
    if differ:
        show = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:5])
        raise UserError(f"{out} holds a checkpoint of a run with another config ({show}); "
                        "use another --out, or --restart to discard it")


@dataclass
class Run:
    """What every stage of one fine-tuning run shares (built once in `_fine_tune`)."""
    cfg: Config
    dist: DistInfo
    model: nn.Module
    meta: dict
    res: Resolved
    data: TransferData
    fit_split: Split             # trainval (split final) or train (split select)
    eval_split: Split            # test or val
    eval_name: str
    out: Path
    log: RunLog
    results: dict
    amp: torch.dtype | None

    def say(self, *args) -> None:
        if self.dist.is_main:
            print(*args, flush=True)

    def evaluate(self, size: int) -> dict:
        return evaluate(self.model, self.eval_split, size, self.meta["preprocessing"], self.cfg, self.dist,
                        self.data.num_classes, self.amp)


def fine_tune(cfg: Config, dist: DistInfo | None = None, restart: bool = False,
              data: TransferData | None = None) -> dict:
    """Build everything from `cfg`, train (resuming from OUT/checkpoint.pt), evaluate, save. Returns the
    results dict also written to OUT/results.json."""
    own_dist = dist is None
    dist = dist or init_distributed(cfg.device)
    try:
        return _fine_tune(cfg, dist, restart, data)
    finally:
        if own_dist:
            cleanup()


def _fine_tune(cfg, dist: DistInfo, restart: bool, data: TransferData | None) -> dict:
    start_time = time.perf_counter()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    data = data or load_dataset(cfg.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction,
                                cfg.data.split_seed)
    final = cfg.data.split == "final"
    seed_everything(cfg.seed)  # same initial weights on every rank
    model, meta = load_student(cfg.backbone, num_classes=data.num_classes, pretrained=cfg.pretrained)
    model.to(dist.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)

    ckpt_path = out / "checkpoint.pt"
    if restart and dist.is_main and ckpt_path.exists():
        ckpt_path.unlink()
    barrier()
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if ckpt is not None:
        _check_resumable(ckpt["config"], cfg.to_dict(), out)
        model.load_state_dict(ckpt["model"])
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg.to_dict(), indent=2)))
    run = Run(cfg, dist, model, meta, resolve_defaults(cfg, meta), data,
              data.trainval if final else data.train, data.test if final else data.val, "test" if final else "val",
              out, RunLog(out, enabled=dist.is_main, resume_step=ckpt["step"] if ckpt else None),
              dict(ckpt["results"]) if ckpt else {}, amp_dtype(cfg, dist.device))
    run.say(f"{data.name}: {data.num_classes} classes, fit {len(run.fit_split)} images "
            f"({'train+val' if final else 'train'}), report {data.metric} on {run.eval_name} ({len(run.eval_split)}); "
            f"backbone {cfg.backbone} ({meta['arch']})")
    run.say(f"using {run.res.describe()}")
    if ckpt is not None:
        run.say(f"resuming from {ckpt_path}: {ckpt['phase']} epoch {ckpt['epoch']}, step {ckpt['step']}")
    run.results.update(dataset=data.name, metric=data.metric, split=cfg.data.split, eval_split=run.eval_name,
                       backbone=cfg.backbone, arch=meta["arch"], lr=cfg.optim.lr, lr_mult=run.res.lr_mult,
                       weight_decay=run.res.weight_decay, train_size=run.res.image_size,
                       test_size=run.res.test_size, sources=run.res.sources)

    step = ckpt["step"] if ckpt else 0
    phases = (["finetune"] if cfg.schedule.epochs > 0 else []) + (["fix"] if cfg.fix.enabled else [])
    for phase in phases:
        if ckpt is not None and phases.index(phase) < phases.index(ckpt["phase"]):
            continue  # finished before the interruption; its weights are in the checkpoint
        step = run_phase(run, phase, ckpt if ckpt is not None and ckpt["phase"] == phase else None, step)
        ckpt = None
    run.log.close()
    results = run.results
    results["seconds"] = round(time.perf_counter() - start_time, 1)
    if dist.is_main:
        atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
        if (out / "metrics.csv").is_file():
            plot_metrics(out / "metrics.csv", out / "metrics.png")
        run.say(format_results(results))
    barrier()
    return results


def run_phase(run: Run, phase: str, resume: dict | None, step: int) -> int:
    """One stage (finetune or fix): build its optimizer, schedule and loader, loop over epochs with a
    checkpoint after each, then evaluate at both resolutions and save the model as an artifact."""
    cfg, dist, model, res, results, metric = run.cfg, run.dist, run.model, run.res, run.results, run.data.metric
    fix = phase == "fix"
    epochs = cfg.fix.epochs if fix else cfg.schedule.epochs
    size = res.test_size if fix else res.image_size
    prep = run.meta["preprocessing"]
    tf = transform("test", prep, size) if fix else transform("random_crop", prep, size, cfg.data.crop_scale)
    batch = per_rank_batch((cfg.fix.batch_size or cfg.train.batch_size) if fix else cfg.train.batch_size,
                           len(run.fit_split), dist, "fix.batch_size" if fix else "train.batch_size")
    loader = make_loader(run.fit_split.with_transform(tf), batch, cfg.data.workers, dist, train=True, seed=cfg.seed)
    steps_per_epoch = len(loader)
    optimizer = torch.optim.SGD(param_groups(model, cfg, res, phase), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0)
    sched = cfg.schedule
    scheduler = build_scheduler(
        optimizer, "cosine" if fix else sched.kind, total_steps=epochs * steps_per_epoch,
        warmup_steps=0 if fix else int(round(sched.warmup_epochs * steps_per_epoch)),
        milestones=[int(m * steps_per_epoch) for m in sched.milestones], gamma=sched.gamma,
        warmup_factor=sched.warmup_factor, min_factor=sched.min_factor)
    scaler = torch.amp.GradScaler(dist.device.type) if run.amp == torch.float16 else None
    net = model
    if dist.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    first_epoch = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        first_epoch = resume["epoch"]
    if fix:
        run.say(f"Fix: classifier only at {size} px with the test preprocessing"
                + (", re-estimating BatchNorm statistics" if cfg.fix.bn_stats else ", BatchNorm frozen"))

    def save_state(epoch):
        if dist.is_main:
            save_checkpoint(run.out / "checkpoint.pt", dict(
                phase=phase, epoch=epoch, step=step, model=model.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else {}, config=cfg.to_dict(), results=results))
        barrier()

    if fix and "finetune" not in results and first_epoch == 0:  # a Fix-only run: the starting point
        results["before_fix"] = dict(at_train_size=run.evaluate(res.image_size), at_test_size=run.evaluate(size))
    for epoch in range(first_epoch, epochs):
        loader.sampler.set_epoch(epoch)
        seed_everything(epoch_seed(cfg.seed, dist.rank, phase, epoch))
        set_train_mode(model, phase, cfg.fix.bn_stats)
        t0 = time.perf_counter()
        loss, seen, skipped = train_one_epoch(
            net, loader, optimizer, scheduler, device=dist.device, amp=run.amp, scaler=scaler,
            label_smoothing=0.0 if fix else cfg.train.label_smoothing, mixup=0.0 if fix else cfg.train.mixup,
            channels_last=cfg.train.channels_last,
            progress=Progress(dist.is_main and cfg.train.progress, f"{phase} {epoch + 1}/{epochs}"))
        seconds = time.perf_counter() - t0
        for item in skipped:
            print(f"warning: skipped unreadable image {item.where}: {item.reason}", flush=True)
        results["skipped_images"] = results.get("skipped_images", 0) + len(skipped)
        step += steps_per_epoch
        scalars = {f"{phase}_loss": loss, "lr": optimizer.param_groups[-1]["lr"],
                   "img_per_s": seen * dist.world_size / max(seconds, 1e-9), "epoch": epoch + 1}
        text = f"{phase} epoch {epoch + 1}/{epochs}: loss {loss:.4f}, {scalars['img_per_s']:.0f} img/s"
        every = cfg.train.eval_every
        if every and (epoch + 1) % every == 0 and epoch + 1 < epochs:  # the last epoch is evaluated below
            scalars[f"{run.eval_name}_{metric}"] = run.evaluate(size)[metric]
            text += f", {run.eval_name} {metric} {scalars[f'{run.eval_name}_{metric}']:.2f}"
        run.log.log(step, **scalars)
        run.say(text)
        save_state(epoch + 1)

    at_train, at_test = run.evaluate(res.image_size), run.evaluate(res.test_size)
    key = "fix" if fix else "finetune"
    results[key] = dict(epochs=epochs, at_train_size=at_train, at_test_size=at_test,
                        score=at_train[metric], score_test_size=at_test[metric])
    if fix:
        results["score_fix"] = at_test[metric]
    else:
        results.update(score=at_train[metric], score_test_size=at_test[metric])
    run.log.log(step, **{f"{run.eval_name}_{metric}": at_train[metric],
                         f"{run.eval_name}_{metric}_test_size": at_test[metric]})
    if dist.is_main:
        path = run.out / ("model_fix.safetensors" if fix else "model.safetensors")
        save_student(path, model, artifact_meta(run.meta, run.data, cfg, res, results, fix))
        results[f"{key}_artifact"] = str(path)
    save_state(epochs)  # with this phase's results, which a resume in the next phase keeps
    model.requires_grad_(True)
    return step


def artifact_meta(meta: dict, data: TransferData, cfg, res: Resolved, results: dict, fix: bool) -> dict:
    meta = copy.deepcopy(meta)
    name = f"{backbone_label(cfg.backbone)}_{dataset_label(data.name)}" + ("_fix" if fix else "")
    meta.update(name=name, num_classes=data.num_classes)
    meta["preprocessing"] = {**meta["preprocessing"], "input_size": res.image_size, "test_input_size": res.test_size}
    meta["transfer"] = dict(dataset=data.name, classes=data.classes, metric=data.metric, split=cfg.data.split,
                            backbone=cfg.backbone, lr=cfg.optim.lr, lr_mult=res.lr_mult, weight_decay=res.weight_decay,
                            epochs=cfg.schedule.epochs, batch_size=cfg.train.batch_size, fix=fix,
                            fix_bn_stats=cfg.fix.bn_stats if fix else None,
                            score=results.get("score"), score_test_size=results.get("score_test_size"),
                            score_fix=results.get("score_fix"))
    return meta


def format_results(r: dict) -> str:
    lines = [f"{r['dataset']} ({r['eval_split']}, {r['metric']}), backbone {r['backbone']}:"]
    if "before_fix" in r:
        p = r["before_fix"]
        lines.append(f"  {'before Fix':11s} {p['at_train_size'][r['metric']]:6.2f} at {r['train_size']} px, "
                     f"{p['at_test_size'][r['metric']]:6.2f} at {r['test_size']} px")
    for key, title in (("finetune", "fine-tuned"), ("fix", "after Fix")):
        if key in r:
            p = r[key]
            lines.append(f"  {title:11s} {p['score']:6.2f} at {r['train_size']} px, "
                         f"{p['score_test_size']:6.2f} at {r['test_size']} px "
                         f"(top-1 {p['at_train_size']['top1']:.2f} / {p['at_test_size']['top1']:.2f})")
    lines.append(f"  took {r.get('seconds', 0):.0f} s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m transfer.finetune", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    return fine_tune(build_config(args), restart=args.restart)


if __name__ == "__main__":
    run_cli(main)
