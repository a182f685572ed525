"""SSLD knowledge distillation trainer: python -m distill.ssld -c configs/r50.yaml [-o key=value] [--restart].

Read top to bottom: the config schema (DEFAULTS), builders (data, student, teacher, optimizer), the
distillation step, the task the engine runs (distill.core.engine), export, then main(). With
`teacher: null` and `loss.kind: ce` the same trainer trains a teacher (or a labels-only baseline) from
labels. Rerunning the same command resumes the run folder's checkpoint exactly.

    torchrun --nproc_per_node 8 -m distill.ssld -c configs/r50.yaml       # one node, 8 GPUs
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

from distill.core.checkpoint import load_checkpoint
from distill.core.config import Config, add_trainer_args, load_config, merge
from distill.core.distributed import cleanup, init_distributed, per_rank_batch, unwrap
from distill.core.engine import RUN_DEFAULTS, RUN_RANGES, Engine, NonFiniteLoss, StepOutput, Task, check_ranges
from distill.core.errors import ArgumentParser, UserError, run_cli
from distill.core.images import ListDataset, build_transform, collate_skipping, normalize_on_device
from distill.core.metrics import evaluate_classifier
from distill.core.precision import AMP_DTYPES, Precision, check_amp
from distill.core.runlog import plot_metrics
from distill.core.schedule import build_scheduler, scale_lr
from distill.data import TrainStream, build_sources, check_class_lists, infer_num_classes
from distill.losses import DistillLoss
from distill.students import zoo
from distill.students.artifact import (IMAGENET_MEAN, IMAGENET_STD, build_meta, check_state_dict, default_test_size,
                                       read_meta, resolve_student, save_student, ssld_home)
from distill.students.stages import stage_param_groups
from distill.teacher import build_teacher

__all__ = ["DEFAULTS", "NonFiniteLoss", "distill_step", "main"]

# The config schema: every key a recipe may set, with its default. Recipes live in configs/*.yaml.
DEFAULTS = dict(
    run=dict(RUN_DEFAULTS, out_dir="runs/ssld"),
    student=dict(
        arch="r50_vd",             # zoo name (python -m distill.zoo) or timm:ARCH; null = the init artifact's
        init=None,                 # start from an artifact (name or path) or a trainer checkpoint
        multipliers=[1.0, 1.0, 1.0, 1.0, 1.0],  # per-stage lr multipliers; 0 freezes a stage
        head_mult=1.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
    ),
    teacher=dict(
        models=[],                 # artifact names/paths, checkpoint.pt, zoo names or timm:ARCH; >1 = ensemble
        pretrained=False,          # timm weights for timm: teachers (needs network)
        bn="train",                # train: batch statistics (PaddleClas default); eval: running statistics
        input_size=None,           # teacher resolution (the student's crop, resized); null = the student's
    ),
    loss=dict(
        kind="ssld",               # ssld | jsd | kl | soft_ce | ce (teacher-less)
        temperature=1.0,           # kl only
        weight=1.0,
        hard_weight=0.0,           # CE on labeled images (0 = label-free SSLD)
        label_smoothing=0.0,
    ),
    data=dict(
        root=None,                 # relative source paths resolve against this folder
        train=[],                  # [{type: folder|list|wds, path, image_root?, weight?, size?}]
        val=None,                  # one source (folder or list) with labels
        num_classes=None,          # null: inferred from the labeled sources
        epoch_samples=None,        # images per epoch; null: the sum of the source sizes
        batch_size=256,            # global: split evenly over the torchrun processes
        input_size=224,
        test_input_size=None,      # null: about 1.15x input_size (FixRes)
        crop_pct=0.875,
        augment="random_crop",     # random_crop | inception | test
        crop_scale=[0.08, 1.0],
        hflip=True,
        mixup=False,               # function matching: mix every batch with itself rolled by one
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        interpolation="bilinear",
        shuffle_buffer=1000,       # WebDataset sample shuffle
    ),
    optim=dict(
        name="sgd",                # sgd | adamw
        lr=0.1,                    # at base_batch; scaled linearly to the global batch
        base_batch=256,
        momentum=0.9,
        nesterov=False,
        betas=[0.9, 0.999],
        weight_decay=1e-4,
        clip_grad_norm=0.0,        # 0 = off; else the global norm
    ),
    schedule=dict(epochs=1, kind="cosine", warmup_epochs=0.0, warmup_factor=0.0, min_factor=0.0,
                  milestones=[], gamma=0.1),  # milestones in epochs (kind: step)
    eval=dict(every_epochs=1, test_resolution=True),  # epochs between evaluations; also at the test resolution
    export=dict(name=None, install=False),    # name: write OUT/NAME.safetensors; install: copy to $SSLD_HOME
)
RANGES = {  # numbers a recipe may set, with their allowed range
    "data": {"batch_size": (1, None), "input_size": (8, None), "test_input_size": (8, None),
             "crop_pct": (0.01, 1.0), "crop_scale": (0.0, 1.0), "epoch_samples": (1, None),
             "shuffle_buffer": (0, None), "num_classes": (2, None)},
    "optim": {"lr": (0.0, None), "base_batch": (1, None), "momentum": (0.0, 1.0), "weight_decay": (0.0, None),
              "clip_grad_norm": (0.0, None)},
    "schedule": {"epochs": (1, None), "warmup_epochs": (0.0, None), "warmup_factor": (0.0, 1.0),
                 "min_factor": (0.0, 1.0)},
    "student": {"drop_rate": (0.0, 1.0), "drop_path_rate": (0.0, 1.0), "head_mult": (0.0, None)},
    "loss": {"temperature": (1e-6, None), "hard_weight": (0.0, None), "label_smoothing": (0.0, 1.0)},
}


def validate(cfg) -> None:
    """Checks the schema's type check cannot make: ranges, choices, and keys that depend on each other."""
    if cfg.teacher is not None:  # a teacher given over `teacher: null` still gets every default
        cfg.teacher = Config.wrap(merge(DEFAULTS["teacher"], cfg.teacher))
    check_ranges(cfg.run, RUN_RANGES, "run.")
    for section, ranges in RANGES.items():
        check_ranges(cfg[section], ranges, f"{section}.")
    if cfg.teacher is not None and cfg.teacher.input_size is not None:
        check_ranges(cfg.teacher, {"input_size": (8, None)}, "teacher.")
    cfg.run.amp = check_amp(cfg.run.amp)
    if len(cfg.data.crop_scale) != 2 or cfg.data.crop_scale[0] > cfg.data.crop_scale[1]:
        raise UserError(f"data.crop_scale={cfg.data.crop_scale!r}: expected [low, high] with 0 <= low <= high <= 1")
    if cfg.optim.name not in ("sgd", "adamw"):
        raise UserError(f"optim.name must be sgd or adamw; got {cfg.optim.name!r}")
    has_teacher = cfg.teacher is not None and bool(cfg.teacher.get("models"))
    if cfg.loss.kind != "ce" and not has_teacher:
        raise UserError(f"loss.kind {cfg.loss.kind!r} needs a teacher: set teacher.models, "
                        "or use loss.kind: ce to train from labels alone")
    if cfg.loss.kind == "ce" and has_teacher:
        raise UserError("loss.kind ce trains without a teacher; set teacher: null, or pick a distillation loss")
    if cfg.data.val is None:
        raise UserError("data.val is required (a labeled folder or list source) for top-1 evaluation")


# ---------------------------------------------------------------------------------------------------
# Builders.

def build_student(cfg, num_classes: int):
    """(model, name for the artifact, stage family) from student.arch, with student.init's weights if set.

    student.init is an artifact (name or path) or a trainer checkpoint; a different class count keeps
    every tensor but the classifier, which is re-initialised.
    """
    s = cfg.student
    kwargs = dict(drop_rate=s.drop_rate)
    if s.drop_path_rate:
        kwargs["drop_path_rate"] = s.drop_path_rate
    if not s.init:
        if not s.arch:
            raise UserError("set student.arch (a zoo name or timm:ARCH) or student.init (an artifact)")
        return zoo.create_model(s.arch, num_classes=num_classes, **kwargs), s.arch, zoo.get_entry(s.arch).family
    state, meta, source = load_init(s.init)
    name = s.arch or meta["arch"]
    arch = zoo.get_entry(name).arch if name in zoo.ZOO or name.startswith("timm:") else name
    if arch != meta["arch"]:
        raise UserError(f"student.arch {s.arch!r} ({arch}) differs from student.init {s.init!r} ({meta['arch']}); "
                        "set student.arch: null to take the init's architecture")
    model = zoo.create_model(name, num_classes=meta["num_classes"], **kwargs)
    check_state_dict(model, state, source)
    model.load_state_dict(state)
    if meta["num_classes"] != num_classes:
        model.reset_classifier(num_classes)
    return model, name, meta["stages"]["family"]


def load_init(init) -> tuple[dict, dict, str]:
    """(state dict, metadata, source) of an artifact or a trainer checkpoint."""
    if Path(str(init)).suffix in (".pt", ".pth"):
        ckpt = load_checkpoint(init)
        if "meta" not in ckpt.get("extra", {}) or "model" not in ckpt:
            raise UserError(f"{init} is not an ssld-kit trainer checkpoint (no model / metadata entries)")
        return ckpt["model"], ckpt["extra"]["meta"], str(init)
    path = resolve_student(init)
    return load_file(str(path)), read_meta(path), str(path)


def build_train_loader(cfg, sources, dist):
    d = cfg.data
    # uint8 until the device (a quarter of the bytes to move); DistillTask.forward normalises there
    transform = build_transform(d.augment, d.input_size, d.mean, d.std, d.crop_pct, d.crop_scale, d.hflip,
                                d.interpolation, output="uint8")
    batch = per_rank_batch(d.batch_size, dist)
    stream = TrainStream(sources, transform, batch, d.epoch_samples, cfg.run.seed, dist.rank,
                         dist.world_size, d.shuffle_buffer)
    # Its own generator: creating an epoch's iterator must not draw from the global RNG (dropout on resume).
    loader = DataLoader(stream, batch_size=batch, num_workers=cfg.run.workers, collate_fn=collate_skipping,
                        pin_memory=dist.device.type == "cuda", prefetch_factor=4 if cfg.run.workers else None,
                        generator=torch.Generator())
    return stream, loader


def build_val_loaders(cfg, val_source, dist) -> dict:
    """{resolution: loader}: the train resolution and the test resolution, each rank its own shard."""
    d = cfg.data
    sizes = [d.input_size]
    if cfg.eval.test_resolution:
        sizes.append(d.test_input_size or default_test_size(d.input_size))
    loaders = {}
    batch = per_rank_batch(d.batch_size, dist)
    for size in dict.fromkeys(sizes):
        transform = build_transform("test", size, d.mean, d.std, d.crop_pct, interpolation=d.interpolation)
        dataset = ListDataset(val_source.samples, transform)
        shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size))  # no padding: exact counts
        loaders[size] = DataLoader(shard, batch_size=batch, num_workers=cfg.run.workers,
                                   collate_fn=collate_skipping, pin_memory=dist.device.type == "cuda",
                                   generator=torch.Generator())
    return loaders


def build_optimizer(cfg, model, family: str):
    o = cfg.optim
    lr = scale_lr(o.lr, cfg.data.batch_size, o.base_batch)
    groups = stage_param_groups(model, cfg.student.multipliers, lr, o.weight_decay, cfg.student.head_mult, family)
    if not groups:
        raise UserError("every parameter is frozen (all multipliers and head_mult are 0): nothing to train")
    if o.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    else:  # decoupled weight decay (Loshchilov & Hutter)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas))
    return optimizer, lr


def build_lr_scheduler(cfg, optimizer, steps_per_epoch: int):
    s = cfg.schedule
    return build_scheduler(optimizer, s.kind, total_steps=s.epochs * steps_per_epoch,
                           warmup_steps=int(round(s.warmup_epochs * steps_per_epoch)),
                           milestones=[int(m * steps_per_epoch) for m in s.milestones], gamma=s.gamma,
                           warmup_factor=s.warmup_factor, min_factor=s.min_factor)


# ---------------------------------------------------------------------------------------------------
# The distillation step.

def mixup_lambda(seed: int, step: int) -> float:
    """Function matching: a ~ Beta(1,1) (= uniform), a = max(a, 1-a); the same on every rank and on resume."""
    a = float(torch.rand((), generator=torch.Generator().manual_seed(seed * 1_000_003 + step)))
    return max(a, 1.0 - a)


def distill_loss(model, teacher, criterion, images, labels, mix: float | None = None):
    """(loss, parts) of one batch. Teacher and student see the same (mixed) pixels."""
    mix_labels = None
    if mix is not None:  # mix with the batch rolled by one, before either network sees it
        images = mix * images + (1.0 - mix) * images.roll(1, dims=0)
        mix_labels = (mix, labels.roll(1, dims=0))
    teacher_probs = teacher(images, criterion.teacher_temperature) if teacher is not None else None
    logits = model(images)
    loss, parts = criterion(logits, teacher_probs, labels, mix_labels)
    return loss, {k: v.detach() for k, v in parts.items()}


def distill_step(model, teacher, criterion, images, labels, optimizer, precision: Precision, *,
                 clip_grad_norm: float = 0.0, mix: float | None = None):
    """One optimisation step outside the engine (benchmarks, tests): the engine's autocast and step."""
    with precision.autocast():
        loss, parts = distill_loss(model, teacher, criterion, images, labels, mix)
    precision.step(loss, optimizer, clip_grad_norm)
    return loss.detach(), parts


class DistillTask(Task):
    """What the engine needs from the distillation trainer: its batches, forward pass and evaluation."""

    def __init__(self, cfg, dist, model, teacher, criterion, stream, loader, val_loaders, optimizer, scheduler,
                 num_classes: int, meta: dict):
        self.cfg, self.dist, self.model, self.teacher, self.criterion = cfg, dist, model, teacher, criterion
        self.stream, self.loader, self.val_loaders = stream, loader, val_loaders
        self.optimizer, self.scheduler, self.num_classes, self.meta = optimizer, scheduler, num_classes, meta
        self.epochs, self.steps_per_epoch = cfg.schedule.epochs, stream.batches_per_epoch
        self.global_batch = cfg.data.batch_size
        self.clip_grad_norm = cfg.optim.clip_grad_norm
        self.eval_every_epochs = cfg.eval.every_epochs
        self.memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format

    def batches(self, epoch: int, start: int):
        self.stream.set_epoch(epoch, start)
        return self.loader

    def forward(self, net, batch, state) -> StepOutput:
        images, labels, _ = batch
        images = normalize_on_device(images.to(self.dist.device, non_blocking=True), self.cfg.data.mean,
                                     self.cfg.data.std).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.dist.device, non_blocking=True)
        mix = mixup_lambda(self.cfg.run.seed, state.iteration) if self.cfg.data.mixup else None
        loss, parts = distill_loss(net, self.teacher, self.criterion, images, labels, mix)
        return StepOutput(loss, parts, len(images))

    def evaluate(self, net) -> dict:
        out = {}
        amp = AMP_DTYPES[self.cfg.run.amp]
        for size, loader in self.val_loaders.items():
            if self.cfg.run.channels_last:
                loader = ((x.contiguous(memory_format=torch.channels_last), *rest) for x, *rest in loader)
            r = evaluate_classifier(net, loader, self.dist.device, self.num_classes, amp)
            tag = "" if size == self.cfg.data.input_size else "_test_res"
            out.update({f"top1{tag}": r["top1"], f"top5{tag}": r["top5"]})
        return out

    def extra_state(self) -> dict:
        return dict(meta=self.meta)


# ---------------------------------------------------------------------------------------------------
# Export.

def export_student(cfg, meta: dict, model, results: list, skipped: int) -> Path:
    meta = dict(meta)
    name = cfg.export.name or Path(cfg.run.out_dir).name
    final = results[-1] if results else {}
    teacher = list(cfg.teacher.models) if cfg.teacher else None
    meta["name"] = name
    decay_kind = "coupled" if cfg.optim.name == "sgd" else "decoupled"  # SGD: L2 in the gradient; AdamW: not
    meta["pretrain"] = dict(
        meta.get("pretrain", {}), weight_decay=cfg.optim.weight_decay, weight_decay_kind=decay_kind,
        weight_decay_source=f"distill.ssld optim.weight_decay ({cfg.optim.name})", epochs=cfg.schedule.epochs,
        teacher=teacher, loss=cfg.loss.to_dict(), data=[dict(s) for s in cfg.data.train],
        optimizer=cfg.optim.name, lr=cfg.optim.lr, batch_size=cfg.data.batch_size, augment=cfg.data.augment,
        mixup=cfg.data.mixup, top1=final.get("top1"), top5=final.get("top5"),
        top1_test_res=final.get("top1_test_res"), top5_test_res=final.get("top5_test_res"),
        skipped_images=skipped)
    path = save_student(Path(cfg.run.out_dir) / f"{name}.safetensors", unwrap(model), meta)
    if cfg.export.install:
        ssld_home().mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ssld_home() / path.name)
    return path


# ---------------------------------------------------------------------------------------------------
# main: parse, build, run.

def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m distill.ssld", description=__doc__.splitlines()[0])
    add_trainer_args(parser, config_required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.override, DEFAULTS, flags={"run.out_dir": getattr(args, "run.out_dir")})
    validate(cfg)
    dist = init_distributed(cfg.run.device)
    try:
        return run(cfg, dist, restart=args.restart)
    finally:
        cleanup()


def run(cfg, dist, restart: bool = False):
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    out_dir = Path(cfg.run.out_dir)
    # Data sources first: a missing path or an empty source fails before any model is built.
    sources = build_sources(cfg.data.train, cfg.data.root)
    val_source = build_sources([cfg.data.val], cfg.data.root)[0]
    check_class_lists(sources + [val_source])
    num_classes = cfg.data.num_classes or infer_num_classes(sources + [val_source])
    if num_classes < 2:
        raise UserError(f"could not infer the number of classes from the data (got {num_classes}); "
                        "set data.num_classes")
    if cfg.loss.hard_weight > 0 or cfg.loss.kind == "ce":
        if not any(s.labeled for s in sources):
            raise UserError("loss needs labels (loss.kind ce or loss.hard_weight > 0) but no train source has any")

    model, arch_name, family = build_student(cfg, num_classes)
    teacher = build_teacher(cfg.teacher, num_classes, cfg.data.mean, cfg.data.std)
    criterion = DistillLoss(cfg.loss.kind, cfg.loss.temperature, cfg.loss.weight, cfg.loss.hard_weight,
                            cfg.loss.label_smoothing)
    stream, loader = build_train_loader(cfg, sources, dist)
    val_loaders = build_val_loaders(cfg, val_source, dist)
    optimizer, lr = build_optimizer(cfg, model, family)
    scheduler = build_lr_scheduler(cfg, optimizer, stream.batches_per_epoch)
    model = model.to(dist.device)
    if teacher is not None:
        teacher.to(dist.device)  # channels_last: a forward-only network runs fastest in it
    meta = build_meta(arch_name, num_classes, model=model,
                      preprocessing=dict(input_size=cfg.data.input_size,
                                         test_input_size=cfg.data.test_input_size
                                         or default_test_size(cfg.data.input_size),
                                         crop_pct=cfg.data.crop_pct, mean=list(cfg.data.mean),
                                         std=list(cfg.data.std), interpolation=cfg.data.interpolation))
    task = DistillTask(cfg, dist, model, teacher, criterion, stream, loader, val_loaders, optimizer, scheduler,
                       num_classes, meta)
    engine = Engine(task, cfg.run, dist, cfg.to_dict(), restart=restart)
    engine.say(f"ssld: {arch_name} <- {'teacher ' + ', '.join(cfg.teacher.models) if teacher else 'labels'} "
               f"({cfg.loss.kind}); {num_classes} classes; {', '.join(s.describe() for s in sources)}; "
               f"{stream.batches_per_epoch} it/epoch x {cfg.schedule.epochs} epochs, global batch "
               f"{cfg.data.batch_size}, lr {lr:g}; {dist.world_size} process(es) on {dist.device}")
    state = engine.run()
    skipped = sum(engine.skipped_per_rank())
    if dist.is_main:
        plot_metrics(out_dir / "metrics.csv", out_dir / "curves.png")
        path = export_student(cfg, meta, engine.net, state.results, skipped)
        print(f"exported {path}" + (f" (installed in {ssld_home()})" if cfg.export.install else ""))
    return engine


if __name__ == "__main__":
    run_cli(main)
