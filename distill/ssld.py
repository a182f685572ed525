"""SSLD knowledge distillation trainer: python -m distill.ssld -c configs/r50.yaml [-o key=value] [--restart].

Read top to bottom: the config schema (DEFAULTS), builders (data, student, teacher, optimizer), the
distillation step, the task the engine runs (distill.core.engine), export, then main(). With
`teacher: null` and `loss.kind: ce` the same trainer trains a teacher (or a labels-only baseline) from
labels. Rerunning the same command resumes the run folder's checkpoint exactly.

    torchrun --nproc_per_node 8 -m distill.ssld -c configs/r50.yaml       # one node, 8 GPUs
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.core.config import Config, add_trainer_args, load_config, merge
from distill.core.distributed import DistInfo, cleanup, init_distributed, per_rank_batch, unwrap
from distill.core.engine import Engine, NonFiniteLoss, StepOutput, Task
from distill.core.errors import ArgumentParser, UserError, run_cli
from distill.core.image_size import own_resolution
from distill.core.images import ListDataset, build_transform, collate_skipping, normalize_on_device
from distill.core.metrics import evaluate_classifier
from distill.core.precision import AMP_DTYPES, Precision
from distill.core.runlog import plot_metrics
from distill.core.schedule import scale_lr
from distill.core.trainer_kit import (RUN_DEFAULTS, RUN_SAFE_ON_RESUME, check_crop_scale, check_ranges, check_run,
                                      check_sections, check_choice, lr_scheduler, seed_for_build, seed_for_training,
                                      sharded_eval_loader)
from distill.data import (Source, TrainStream, build_sources, check_class_lists, class_names_of, infer_num_classes,
                          stream_loader)
from distill.label_cache import build_cached_stream, dense_targets
from distill.losses import DistillLoss
from distill.students import zoo
from distill.students.artifact import (IMAGENET_MEAN, IMAGENET_STD, build_meta, check_state_dict, preprocessing,
                                       read_meta, read_weights, save_student, ssld_home, with_classes)
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
        cache=None,                # LABELS/ from python -m distill.relabel: each crop's stored top-k, no teacher runs
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
        input_size=None,           # null: student.init's; a fresh student.arch: the data's own size (sampled)
        test_input_size=None,      # null: about 1.15x input_size (FixRes)
        crop_pct=0.875,
        augment="random_crop",     # random_crop | inception | test
        crop_scale=[0.08, 1.0],    # RandomResizedCrop's area range
        hflip=True,
        function_matching=False,   # mix every batch with itself rolled by one (Beyer et al.), before either net
        class_names=None,          # a list, or a text file with one name per line; null: the folder sources' classes
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


RENAMED = {"data.mixup": "renamed data.function_matching (true: mix every batch with itself rolled by one); "
                         "transfer.finetune's data.mixup, a Beta alpha, is another thing"}


def check(cfg: Config) -> Config:
    """The checks a type check cannot make: ranges, choices, and keys that depend on each other."""
    if cfg.teacher is not None:  # a teacher given over `teacher: null` still gets every default
        cfg.teacher = Config.wrap(merge(DEFAULTS["teacher"], cfg.teacher))
    check_run(cfg)
    check_sections(cfg, RANGES)
    if cfg.teacher is not None and cfg.teacher.input_size is not None:
        check_ranges(cfg.teacher, {"input_size": (8, None)}, "teacher.")
    check_crop_scale(cfg.data.crop_scale)
    check_choice(cfg.optim.name, "optim.name", ("sgd", "adamw"))
    has_teacher = cfg.teacher is not None and bool(cfg.teacher.get("models") or cfg.teacher.get("cache"))
    if cfg.loss.kind != "ce" and not has_teacher:
        raise UserError(f"loss.kind {cfg.loss.kind!r} needs a teacher: set teacher.models (or teacher.cache), "
                        "or use loss.kind: ce to train from labels alone")
    if cfg.loss.kind == "ce" and has_teacher:
        raise UserError("loss.kind ce trains without a teacher; set teacher: null (no teacher.models, no "
                        "teacher.cache), or pick a distillation loss")
    if cfg.data.val is None:
        raise UserError("data.val is required (a labeled folder or list source) for top-1 evaluation")
    if cfg.data.input_size is None:
        cfg.data.input_size, why = default_input_size(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"data.input_size {cfg.data.input_size} px ({why})", file=sys.stderr, flush=True)
    return cfg


def default_input_size(cfg) -> tuple[int, str]:
    """(resolution, why) when the recipe gives none: student.init's training resolution; a fresh
    student.arch has none, so the data's own (a random init upsampled to 224 px pays 49x for 32 px scans)."""
    init = cfg.student.init
    if init and Path(str(init)).suffix not in (".pt", ".pth"):
        return int(read_meta(init)["preprocessing"]["input_size"]), f"student.init {init}'s input_size"
    if not init:
        files = [p for s in build_sources(cfg.data.train, cfg.data.root) if s.type != "wds" for p, _ in s.samples]
        size, why = own_resolution(files)
        if size is not None:
            return size, f"{why}; a fresh student.arch has no pretrained resolution"
    return 224, "the default: set data.input_size"


# ---------------------------------------------------------------------------------------------------
# Builders.

@dataclass
class DistillData:
    """The checked data sources, before any model is built."""
    train: list[Source]
    val: Source
    num_classes: int
    classes: list[str] | None      # names in label order, when the data or data.class_names gives them
    classes_source: str | None


def load_data(cfg) -> DistillData:
    """Every source opened and checked (a missing path or an empty source fails before a model is built)."""
    sources = build_sources(cfg.data.train, cfg.data.root)
    val = build_sources([cfg.data.val], cfg.data.root)[0]
    check_class_lists(sources + [val])
    num_classes = cfg.data.num_classes or infer_num_classes(sources + [val])
    if num_classes < 2:
        raise UserError(f"could not infer the number of classes from the data (got {num_classes}); "
                        "set data.num_classes")
    if (cfg.loss.hard_weight > 0 or cfg.loss.kind == "ce") and not any(s.labeled for s in sources):
        raise UserError("loss needs labels (loss.kind ce or loss.hard_weight > 0) but no train source has any")
    classes, where = class_names_of(sources + [val], num_classes, cfg.data.class_names, cfg.data.root)
    return DistillData(sources, val, num_classes, classes, where)


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
    state, meta, source = read_weights(s.init)
    name = s.arch or meta["arch"]
    arch = zoo.get_entry(name).arch if zoo.is_zoo_name(name) else name
    if arch != meta["arch"]:
        raise UserError(f"student.arch {s.arch!r} ({arch}) differs from student.init {s.init!r} ({meta['arch']}); "
                        "set student.arch: null to take the init's architecture")
    model = zoo.create_model(name, num_classes=meta["num_classes"], **kwargs)
    check_state_dict(model, state, source)
    model.load_state_dict(state)
    if meta["num_classes"] != num_classes:
        model.reset_classifier(num_classes)
    return model, name, meta["stages"]["family"]


def train_transform(cfg):
    """The training augmentation, uint8 until the device (a quarter of the bytes to move; DistillTask.forward
    normalises there). distill.relabel draws the same crops through it."""
    d = cfg.data
    return build_transform(d.augment, d.input_size, d.mean, d.std, d.crop_pct, d.crop_scale, d.hflip,
                           d.interpolation, output="uint8")


def build_train_loader(cfg, sources, dist):
    d = cfg.data
    batch = per_rank_batch(d.batch_size, dist)
    stream = TrainStream(sources, train_transform(cfg), batch, d.epoch_samples, cfg.run.seed, dist.rank,
                         dist.world_size, d.shuffle_buffer)
    return stream, stream_loader(stream, cfg.run.workers, dist.device, collate_skipping)


def build_val_loaders(cfg, val_source, dist) -> dict:
    """{resolution: loader}: the train resolution and the test resolution, each rank its own shard."""
    d = cfg.data
    sizes = [d.input_size]
    if cfg.eval.test_resolution:
        sizes.append(student_preprocessing(cfg)["test_input_size"])
    batch = per_rank_batch(d.batch_size, dist)
    return {size: sharded_eval_loader(ListDataset(val_source.samples, build_transform(
        "test", size, d.mean, d.std, d.crop_pct, interpolation=d.interpolation)), batch, cfg.run.workers, dist)
        for size in dict.fromkeys(sizes)}


def student_preprocessing(cfg) -> dict:
    """The artifact's preprocessing block from the data section (the test size defaults to ~1.15x)."""
    d = cfg.data
    return preprocessing(d.input_size, d.test_input_size, d.crop_pct, d.mean, d.std, d.interpolation)


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
    """The distillation trainer as the engine runs it: the student, its teacher (or none: labels only; or
    the teacher's labels cached per crop), the mixed training stream, and top-1 at the train and test
    resolutions."""
    safe_on_resume = RUN_SAFE_ON_RESUME + ("optim.lr", "optim.clip_grad_norm", "schedule.epochs")
    advice = ("optim.lr", "optim.clip_grad_norm")

    def __init__(self, cfg, dist: DistInfo, data: DistillData):
        self.cfg, self.dist, self.data = cfg, dist, data
        self.model, self.arch_name, family = build_student(cfg, data.num_classes)
        self.criterion = DistillLoss(cfg.loss.kind, cfg.loss.temperature, cfg.loss.weight, cfg.loss.hard_weight,
                                     cfg.loss.label_smoothing)
        self.teacher, self.cache = None, None
        if cfg.teacher is not None and cfg.teacher.cache:   # the records replay each crop; no teacher is built
            self.stream, self.loader, self.cache = build_cached_stream(cfg, cfg.teacher.cache, data.train, dist,
                                                                       data.num_classes)
        else:
            with torch.random.fork_rng(devices=[]):   # building it draws nothing a cached run would not
                self.teacher = build_teacher(cfg.teacher, data.num_classes, cfg.data.mean, cfg.data.std)
            self.stream, self.loader = build_train_loader(cfg, data.train, dist)
        self.val_loaders = build_val_loaders(cfg, data.val, dist)
        self.optimizer, self.lr = build_optimizer(cfg, self.model, family)
        self.scheduler = lr_scheduler(self.optimizer, cfg.schedule, self.stream.batches_per_epoch)
        self.model.to(dist.device)
        if self.teacher is not None:
            self.teacher.to(dist.device)  # channels_last: a forward-only network runs fastest in it
        self.meta = build_meta(self.arch_name, data.num_classes, model=self.model,
                               preprocessing=student_preprocessing(cfg))
        if data.classes:
            self.meta = with_classes(self.meta, data.classes, data.classes_source)
        self.epochs, self.steps_per_epoch = cfg.schedule.epochs, self.stream.batches_per_epoch
        self.global_batch = cfg.data.batch_size
        self.clip_grad_norm = cfg.optim.clip_grad_norm
        self.eval_every_epochs = cfg.eval.every_epochs
        self.memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format

    def describe(self) -> str:
        cfg = self.cfg
        if self.cache is not None:
            source = (f"cached labels {cfg.teacher.cache} (top-{self.cache['k']} of "
                      f"{', '.join(t['source'] for t in self.cache['teachers'])})")
        else:
            source = "teacher " + ", ".join(cfg.teacher.models) if self.teacher else "labels"
        return (f"ssld: {self.arch_name} <- {source} ({cfg.loss.kind}); {self.data.num_classes} classes; "
                f"{', '.join(s.describe() for s in self.data.train)}; {self.steps_per_epoch} it/epoch x "
                f"{self.epochs} epochs, global batch {self.global_batch}, lr {self.lr:g}; "
                f"{self.dist.world_size} process(es) on {self.dist.device}")

    def batches(self, epoch: int, start: int):
        self.stream.set_epoch(epoch, start)
        return self.loader

    def forward(self, net, batch, state) -> StepOutput:
        images, labels, *cached, _ = batch
        device = self.dist.device
        images = normalize_on_device(images.to(device, non_blocking=True), self.cfg.data.mean,
                                     self.cfg.data.std).contiguous(memory_format=self.memory_format)
        labels = labels.to(device, non_blocking=True)
        teacher, mix = self.teacher, None
        if cached:   # (top-k classes, their probabilities) per image, at the recipe's temperature already
            probs = dense_targets(*(t.to(device, non_blocking=True) for t in cached), self.data.num_classes)
            teacher = lambda _images, _temperature: probs   # noqa: E731 (the stored answer to this very crop)
        elif self.cfg.data.function_matching:
            mix = mixup_lambda(self.cfg.run.seed, state.iteration)
        loss, parts = distill_loss(net, teacher, self.criterion, images, labels, mix)
        return StepOutput(loss, parts, len(images))

    def evaluate(self, net) -> dict:
        out = {}
        for size, loader in self.val_loaders.items():
            r = evaluate_classifier(net, loader, self.dist.device, self.data.num_classes,
                                    AMP_DTYPES[self.cfg.run.amp], channels_last=self.cfg.run.channels_last)
            tag = "" if size == self.cfg.data.input_size else "_test_res"
            out.update({f"top1{tag}": r["top1"], f"top5{tag}": r["top5"]})
        return out

    def extra_state(self) -> dict:
        return dict(meta=self.meta)

    def teacher_record(self) -> dict:
        """What the artifact records as its teacher: the models, or the cache and the models behind it."""
        t = self.cfg.teacher
        if self.cache is not None:
            return dict(teacher=[m["source"] for m in self.cache["teachers"]],
                        teacher_cache=dict(path=str(Path(t.cache).resolve()), k=self.cache["k"],
                                           fingerprint=self.cache["fingerprint"]))
        return dict(teacher=list(t.models) if t is not None else None)


# ---------------------------------------------------------------------------------------------------
# Export.

def export_student(cfg, meta: dict, model, results: list, skipped: int, teacher: dict) -> Path:
    meta = dict(meta)
    name = cfg.export.name or Path(cfg.run.out_dir).name
    final = results[-1] if results else {}
    meta["name"] = name
    decay_kind = "coupled" if cfg.optim.name == "sgd" else "decoupled"  # SGD: L2 in the gradient; AdamW: not
    meta["pretrain"] = dict(
        meta.get("pretrain", {}), weight_decay=cfg.optim.weight_decay, weight_decay_kind=decay_kind,
        weight_decay_source=f"distill.ssld optim.weight_decay ({cfg.optim.name})", epochs=cfg.schedule.epochs,
        **teacher, loss=cfg.loss.to_dict(), data=[dict(s) for s in cfg.data.train],
        optimizer=cfg.optim.name, lr=cfg.optim.lr, batch_size=cfg.data.batch_size, augment=cfg.data.augment,
        function_matching=cfg.data.function_matching, top1=final.get("top1"), top5=final.get("top5"),
        top1_test_res=final.get("top1_test_res"), top5_test_res=final.get("top5_test_res"),
        skipped_images=skipped)
    path = save_student(Path(cfg.run.out_dir) / f"{name}.safetensors", unwrap(model), meta)
    if cfg.export.install:
        ssld_home().mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ssld_home() / path.name)
    return path


# ---------------------------------------------------------------------------------------------------
# main: parse, build, run.

def parse(argv=None):
    parser = ArgumentParser(prog="python -m distill.ssld", description=__doc__.splitlines()[0])
    add_trainer_args(parser, config_required=True)
    return parser.parse_args(argv)


def load(args) -> Config:
    return load_config(args.config, args.override, DEFAULTS, flags={"run.out_dir": getattr(args, "run.out_dir")},
                       renamed=RENAMED)


def main(argv=None):
    args = parse(argv)
    cfg = check(load(args))
    dist = init_distributed(cfg.run.device)
    try:
        return run(cfg, dist, restart=args.restart)
    finally:
        cleanup()


def run(cfg: Config, dist: DistInfo, restart: bool = False) -> Engine:
    """Build the task, train it on the engine (resuming), export the student. Returns the engine."""
    seed_for_build(cfg.run.seed)
    task = DistillTask(cfg, dist, load_data(cfg))
    seed_for_training(cfg.run.seed, dist)
    engine = Engine(task, cfg, dist, restart=restart)
    engine.say(task.describe())
    state = engine.run()
    skipped = engine.skipped_total()
    if dist.is_main:
        out_dir = Path(cfg.run.out_dir)
        plot_metrics(out_dir / "metrics.csv", out_dir / "curves.png")
        path = export_student(cfg, task.meta, engine.net, state.results, skipped, task.teacher_record())
        print(f"exported {path}" + (f" (installed in {ssld_home()})" if cfg.export.install else ""))
    return engine


if __name__ == "__main__":
    run_cli(main)
