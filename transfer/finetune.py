"""Fine-tune a student artifact (or a timm model) on a transfer dataset, and report it at two resolutions.

    python -m transfer.finetune --dataset flowers102 --backbone r50_vd_ssld
    python -m transfer.finetune --dataset demo --backbone timm:resnet18d --fix
    torchrun --nproc-per-node 8 -m transfer.finetune --dataset sun397 --backbone r50_vd_ssld

Per-stage lr multipliers and weight decay default to the artifact's recommended.transfer and its matched
pretraining decay; preprocessing comes from the artifact. Accuracy is always reported at the train
resolution and at a higher test resolution (FixRes); --fix then fine-tunes only the classifier at the
test resolution with the test preprocessing (optionally re-estimating BatchNorm statistics). Training
runs on distill.core.engine: rerun the same command to resume exactly, --restart to start over. The run
folder holds checkpoint.pt (checkpoint_fix.pt for --fix), metrics.csv/.png, results.json and the
fine-tuned model as a student artifact (model.safetensors, and model_fix.safetensors after --fix).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from distill.core.atomic import atomic_write
from distill.core.config import Config
from distill.core.cross_entropy import hard_ce_loss
from distill.core.distributed import DistInfo, barrier, cleanup, init_distributed, per_rank_batch
from distill.core.engine import Engine, NonFiniteLoss, StepOutput, Task
from distill.core.errors import run_cli
from distill.core.image_size import own_resolution
from distill.core.images import collate_skipping
from distill.core.metrics import evaluate_classifier
from distill.core.order import resumable_loader
from distill.core.precision import AMP_DTYPES
from distill.core.runlog import plot_metrics
from distill.core.schedule import scale_lr
from distill.core.trainer_kit import (RUN_SAFE_ON_RESUME, lr_scheduler, seed_for_build, seed_for_training,
                                      sharded_eval_loader)
from distill.students.artifact import default_test_size, load_student, preprocess, save_student, with_classes
from distill.students.decay import weight_decay_for
from distill.students.stages import parse_multipliers, stage_param_groups

from .config import backbone_label, check, dataset_label, default_out, load, parse
from .datasets import load_dataset
from .splits import Split, TransferData

Diverged = NonFiniteLoss  # what transfer.search catches for a cell whose loss blew up

# ---------------------------------------------------------------------------------------------------
# Build: resolved hyper-parameters, transforms, optimizer. No training here.

def crop_scale_for(size: int) -> tuple[float, float]:
    """RandomResizedCrop's smallest area by resolution: 8% (the ImageNet default) at 224 px and above, growing
    as images get smaller so the smallest crop keeps about the same side in pixels (capped at 60%): on 32 px
    images an 8% crop is a 9 px patch that no longer shows the object."""
    return (min(0.6, round(0.08 * 224 / max(size, 1), 3)) if size < 224 else 0.08, 1.0)


@dataclass
class Resolved:
    """What the run uses after the artifact filled in the defaults, with where each value came from."""
    lr_mult: list
    weight_decay: float
    image_size: int
    test_size: int
    crop_scale: tuple
    family: str
    sources: dict

    def describe(self) -> str:
        return "; ".join(f"{k} {v}" for k, v in self.sources.items())


def sample_images(split: Split, n: int = 64) -> list:
    """Paths where the source lists its files (ImageFolder: headers only), else decoded images."""
    picks = sorted({round(i * (len(split) - 1) / max(n - 1, 1)) for i in range(min(n, len(split)))})
    out = []
    for i in picks:
        s, j = split.items[i]
        listed = getattr(split.sources[s], "samples", None)
        out.append(listed[j][0] if listed else split.sources[s][j][0])
    return out


def train_size(cfg, meta: dict, data: TransferData | None) -> tuple[int, str]:
    """(train resolution, where it came from): given; else the data's own size for a backbone with no
    pretrained resolution (random init); else the artifact's."""
    if cfg.data.image_size:
        return cfg.data.image_size, "given"
    if data is not None and (meta.get("pretrain") or {}).get("source") == "random init":
        size, why = own_resolution(sample_images(data.train))
        if size is not None:
            return size, f"{why}; random init has no pretrained resolution"
    return int(meta["preprocessing"]["input_size"]), "the backbone's preprocessing"


def resolve_defaults(cfg, meta: dict, data: TransferData | None = None) -> Resolved:
    sources = {}
    family = meta.get("stages", {}).get("family", "generic")
    if cfg.optim.lr_mult is not None:
        mults = parse_multipliers(cfg.optim.lr_mult, family)
        sources["lr_mult"] = f"{_fmt(mults)} (given)"
    else:
        mults = parse_multipliers(meta.get("recommended", {}).get("transfer") or [1.0] * 5, family)
        sources["lr_mult"] = f"{_fmt(mults)} (the artifact's recommended.transfer)"
    wd, sources["weight_decay"] = weight_decay_for(cfg.optim.weight_decay, meta, cfg.optim.default_weight_decay,
                                                   "--weight-decay / optim.weight_decay")
    prep = meta["preprocessing"]
    size, size_why = train_size(cfg, meta, data)
    if cfg.data.test_size:
        test = cfg.data.test_size
    elif size == int(prep["input_size"]) and prep.get("test_input_size"):
        test = int(prep["test_input_size"])
    else:
        test = default_test_size(size)
    scale = tuple(cfg.data.crop_scale) if cfg.data.crop_scale is not None else crop_scale_for(size)
    sources["resolution"] = (f"train {size} px ({size_why}; crops of {scale[0]:g}-{scale[1]:g} of the area), "
                             f"test {test} px")
    return Resolved(mults, wd, size, test, scale, family, sources)


def _fmt(mults) -> str:
    return ",".join(f"{m:g}" for m in mults)


def param_groups(model: nn.Module, cfg, res: Resolved, phase: str, lr: float) -> list[dict]:
    """finetune: per-stage groups (distill.students.stages). fix: the classifier only, everything else frozen."""
    if phase == "finetune":
        return stage_param_groups(model, res.lr_mult, lr, res.weight_decay, head_mult=cfg.optim.head_mult,
                                  family=res.family)
    model.requires_grad_(False)
    head = list(model.get_classifier().parameters())
    for p in head:
        p.requires_grad_(True)
    return [dict(params=head, lr=lr, lr_mult=1.0, weight_decay=res.weight_decay, name="head")]


def set_train_mode(model: nn.Module, phase: str, bn_stats: bool) -> None:
    """finetune: everything in train mode. fix: eval mode (frozen BN statistics, no dropout), except
    BatchNorm layers when their statistics are re-estimated."""
    model.train(phase == "finetune")
    if phase == "fix" and bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def fitting_batch(batch_size: int, n_train: int, dist: DistInfo, name: str) -> int:
    """This rank's share of the global batch, capped so a tiny training set still makes one step."""
    per_rank = per_rank_batch(batch_size, dist, name)
    fit = n_train // dist.world_size
    if per_rank > fit:
        if dist.is_main:
            print(f"note: {name} {batch_size} is larger than the {n_train} training images; using {fit * dist.world_size}")
        per_rank = max(fit, 1)
    return per_rank


def mix_batch(images, labels, alpha: float):
    """Mixup with the batch rolled by one, lam ~ Beta(alpha, alpha) from the torch RNG (checkpointed per rank)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return lam * images + (1 - lam) * images.roll(1, 0), (lam, labels.roll(1, 0))


# ---------------------------------------------------------------------------------------------------
# Run: what every phase shares, the task the engine runs, and the phases.

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
    results: dict

    def say(self, *args) -> None:
        if self.dist.is_main:
            print(*args, flush=True)

    def evaluate(self, net: nn.Module, size: int) -> dict:
        cfg = self.cfg
        batch = (cfg.data.eval_batch_size or 2 * cfg.data.batch_size) // self.dist.world_size
        loader = sharded_eval_loader(self.eval_split.with_transform(preprocess(self.meta["preprocessing"], size)),
                                     batch, cfg.run.workers, self.dist)
        return evaluate_classifier(net, loader, self.dist.device, self.data.num_classes, AMP_DTYPES[cfg.run.amp],
                                   channels_last=cfg.run.channels_last)


class FinetuneTask(Task):
    """One phase (finetune, or fix) of a fine-tuning run, as the engine runs it."""
    min_batch = 2  # BatchNorm cannot train on one image
    safe_on_resume = RUN_SAFE_ON_RESUME + ("optim.lr", "optim.clip_grad_norm", "schedule.epochs", "fix.epochs",
                                          "fix.lr")
    advice = ("optim.lr", "optim.clip_grad_norm")

    def __init__(self, run: Run, phase: str):
        cfg, dist, res = run.cfg, run.dist, run.res
        self.run, self.phase, self.model = run, phase, run.model
        fix = phase == "fix"
        self.epochs = cfg.fix.epochs if fix else cfg.schedule.epochs
        self.size = res.test_size if fix else res.image_size
        prep = run.meta["preprocessing"]
        tf = preprocess(prep, self.size) if fix else preprocess(prep, self.size, "random_crop", res.crop_scale)
        self.global_batch = (cfg.fix.batch_size or cfg.data.batch_size) if fix else cfg.data.batch_size
        batch = fitting_batch(self.global_batch, len(run.fit_split), dist,
                               "fix.batch_size" if fix else "data.batch_size")
        self.global_batch = batch * dist.world_size
        self.loader = resumable_loader(run.fit_split.with_transform(tf), batch, cfg.run.seed + (1 if fix else 0),
                                       dist.rank, dist.world_size, cfg.run.workers, collate_skipping,
                                       pin_memory=dist.device.type == "cuda")
        self.steps_per_epoch = self.loader.batch_sampler.batches_per_epoch
        lr = scale_lr(cfg.fix.lr if fix else cfg.optim.lr, self.global_batch, cfg.optim.base_batch)
        self.optimizer = torch.optim.SGD(param_groups(run.model, cfg, res, phase, lr), lr=lr,
                                         momentum=cfg.optim.momentum,
                                         nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0)
        schedule = dict(cfg.schedule, kind="cosine", epochs=self.epochs, warmup_epochs=0.0) if fix else cfg.schedule
        self.scheduler = lr_scheduler(self.optimizer, schedule, self.steps_per_epoch)
        self.clip_grad_norm = cfg.optim.clip_grad_norm
        self.eval_every_epochs = cfg.eval.every_epochs
        self.label_smoothing = 0.0 if fix else cfg.loss.label_smoothing
        self.mixup = 0.0 if fix else cfg.data.mixup
        self.device, self.channels_last = dist.device, cfg.run.channels_last

    def batches(self, epoch: int, start: int):
        self.loader.batch_sampler.set_epoch(epoch, start)
        return self.loader

    def forward(self, net, batch, state) -> StepOutput:
        images, labels, _ = batch
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mix = None
        if self.mixup > 0:
            images, mix = mix_batch(images, labels, self.mixup)
        loss = hard_ce_loss(net(images), labels, mix, self.label_smoothing)
        return StepOutput(loss, {}, len(labels))

    def evaluate(self, net) -> dict:
        metric, name = self.run.data.metric, self.run.eval_name
        return {f"{name}_{metric}": self.run.evaluate(net, self.size)[metric]}

    def train_mode(self, net) -> None:
        set_train_mode(self.model, self.phase, self.run.cfg.fix.bn_stats)


def fine_tune(cfg: Config, dist: DistInfo | None = None, restart: bool = False,
              data: TransferData | None = None) -> dict:
    """Build everything from `cfg`, train (resuming from the run folder), evaluate, save. Returns the results
    dict also written to OUT/results.json."""
    own_dist = dist is None
    dist = dist or init_distributed(cfg.run.device)
    try:
        return _fine_tune(cfg, dist, restart, data)
    finally:
        if own_dist:
            cleanup()


def _fine_tune(cfg, dist: DistInfo, restart: bool, data: TransferData | None) -> dict:
    start_time = time.perf_counter()
    out = Path(cfg.run.out_dir) if cfg.run.out_dir else default_out(cfg)
    cfg.run.out_dir = str(out)
    data = data or load_dataset(cfg.dataset, cfg.data.root, cfg.data.download, cfg.data.val_fraction,
                                cfg.data.split_seed)
    final = cfg.data.split == "final"
    seed_for_build(cfg.run.seed)
    model, meta = load_student(cfg.backbone, num_classes=data.num_classes, pretrained=cfg.pretrained)
    model.to(dist.device)
    seed_for_training(cfg.run.seed, dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg.to_dict(), indent=2)))
    run = Run(cfg, dist, model, meta, resolve_defaults(cfg, meta, data), data,
              data.trainval if final else data.train, data.test if final else data.val, "test" if final else "val",
              out, {})
    run.say(f"{data.name}: {data.num_classes} classes, fit {len(run.fit_split)} images "
            f"({'train+val' if final else 'train'}), report {data.metric} on {run.eval_name} ({len(run.eval_split)}); "
            f"backbone {cfg.backbone} ({meta['arch']})")
    run.say(f"using {run.res.describe()}")
    run.results.update(dataset=data.name, metric=data.metric, split=cfg.data.split, eval_split=run.eval_name,
                       backbone=cfg.backbone, arch=meta["arch"], lr=cfg.optim.lr, lr_mult=run.res.lr_mult,
                       weight_decay=run.res.weight_decay, train_size=run.res.image_size,
                       test_size=run.res.test_size, sources=run.res.sources)
    if cfg.fix.enabled and cfg.schedule.epochs == 0:  # a Fix-only run: its starting point
        run.results["before_fix"] = dict(at_train_size=run.evaluate(model, run.res.image_size),
                                         at_test_size=run.evaluate(model, run.res.test_size))
    for phase in (["finetune"] if cfg.schedule.epochs > 0 else []) + (["fix"] if cfg.fix.enabled else []):
        run_phase(run, phase, restart)
    results = run.results
    results["seconds"] = round(time.perf_counter() - start_time, 1)
    if dist.is_main:
        atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
        if (out / "metrics.csv").is_file():
            plot_metrics(out / "metrics.csv", out / "metrics.png")
        run.say(format_results(results))
    barrier()
    return results


def run_phase(run: Run, phase: str, restart: bool) -> None:
    """One stage (finetune or fix) on the engine, then both resolutions evaluated and the model saved."""
    cfg, res, results, metric = run.cfg, run.res, run.results, run.data.metric
    fix = phase == "fix"
    task = FinetuneTask(run, phase)
    if fix:
        run.say(f"Fix: classifier only at {task.size} px with the test preprocessing"
                + (", re-estimating BatchNorm statistics" if cfg.fix.bn_stats else ", BatchNorm frozen"))
    engine = Engine(task, cfg, run.dist, restart=restart,
                    checkpoint_name="checkpoint_fix.pt" if fix else "checkpoint.pt")
    engine.run()
    at_train, at_test = run.evaluate(engine.net, res.image_size), run.evaluate(engine.net, res.test_size)
    results["skipped_images"] = results.get("skipped_images", 0) + engine.skipped_total()
    results[phase] = dict(epochs=task.epochs, at_train_size=at_train, at_test_size=at_test,
                          score=at_train[metric], score_test_size=at_test[metric])
    if fix:
        results["score_fix"] = at_test[metric]
    else:
        results.update(score=at_train[metric], score_test_size=at_test[metric])
    if run.dist.is_main:
        path = run.out / ("model_fix.safetensors" if fix else "model.safetensors")
        save_student(path, run.model, artifact_meta(run.meta, run.data, cfg, res, results, fix))
        results[f"{phase}_artifact"] = str(path)
    run.model.requires_grad_(True)


def artifact_meta(meta: dict, data: TransferData, cfg, res: Resolved, results: dict, fix: bool) -> dict:
    meta = copy.deepcopy(meta)
    name = f"{backbone_label(cfg.backbone)}_{dataset_label(data.name)}" + ("_fix" if fix else "")
    meta.update(name=name, num_classes=data.num_classes)
    meta = with_classes(meta, data.classes, data.root if data.name.startswith("folder:") else data.name)
    meta["preprocessing"] = {**meta["preprocessing"], "input_size": res.image_size, "test_input_size": res.test_size}
    meta["transfer"] = dict(dataset=data.name, metric=data.metric, split=cfg.data.split,
                            backbone=cfg.backbone, lr=cfg.optim.lr, lr_mult=res.lr_mult, weight_decay=res.weight_decay,
                            epochs=cfg.schedule.epochs, batch_size=cfg.data.batch_size, fix=fix,
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


def main(argv=None) -> dict:
    args = parse(argv, __doc__)
    return fine_tune(check(load(args)), restart=args.restart)


if __name__ == "__main__":
    run_cli(main)
