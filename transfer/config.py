"""transfer.finetune's config: the schema, its flags, and the parse -> load -> check steps.

Every key a recipe (configs/transfer/*.yaml), `-o KEY=VALUE` or a flag may set, with its default; the
flags are shorthands for config keys, so a recipe and a command line say the same things.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from distill.core.config import Config, add_trainer_args, load_config
from distill.core.errors import ArgumentParser, UserError
from distill.core.recipes import resolve_recipe
from distill.core.trainer_kit import RUN_DEFAULTS, check_choice, check_crop_scale, check_run, check_sections
from distill.students.stages import parse_multipliers
from distill.students.zoo import TIMM_PREFIX

from .datasets import dataset_names

DEFAULTS = dict(
    dataset=None,              # flowers102 caltech101 pets dtd aircraft cars sun397 cifar10 cifar100 food101 | demo | folder:PATH
    backbone=None,             # student artifact name or path, or timm:ARCH
    pretrained=False,          # timm:ARCH only: start from timm's ImageNet weights (needs network or a timm cache)
    run=dict(RUN_DEFAULTS, out_dir=None),   # out_dir null: runs/transfer/<dataset>/<backbone>[_select]
    data=dict(
        root=None,             # default $SSLD_DATA or ./data
        download=False,        # let torchvision download the dataset into the root
        split="final",         # final: fit train+val, report test | select: fit train, report val (grid search)
        val_fraction=0.2,      # held-out share of the official training set where no validation split exists
        split_seed=0,          # seeds the held-out validation split and Caltech101's 30 images per class
        image_size=0,          # train resolution; 0 = the artifact's preprocessing.input_size
        test_size=0,           # the higher test resolution; 0 = the artifact's test_input_size (about 1.15x)
        crop_scale=None,       # RandomResizedCrop area range; null = by resolution (see crop_scale_for)
        batch_size=64,         # global: split evenly over the torchrun processes
        eval_batch_size=0,     # global; 0 = 2 x batch_size
        mixup=0.0,             # Beta(alpha, alpha) mixing with the batch rolled by one; 0 = off
    ),
    optim=dict(
        lr=0.01,               # base lr of the classifier at base_batch (scaled linearly); stage i: lr * lr_mult[i]
        base_batch=64,
        lr_mult=None,          # 5 numbers, e.g. 0.1,0.1,0.2,0.2,0.3; null = the artifact's recommended.transfer
        head_mult=1.0,
        weight_decay=None,     # null = matched to the artifact's pretraining L2 (distill.students.decay)
        default_weight_decay=1.0e-4,   # ... or this when the artifact records none
        momentum=0.9,
        nesterov=True,         # Kornblith et al. fine-tune with Nesterov momentum
        clip_grad_norm=0.0,    # 0 = off; else the global gradient norm
    ),
    loss=dict(label_smoothing=0.0),
    schedule=dict(kind="cosine", epochs=30, warmup_epochs=1.0, warmup_factor=0.001, min_factor=0.0,
                  milestones=[], gamma=0.1),   # milestones in epochs (kind: step)
    eval=dict(every_epochs=1),                 # epochs between evaluations (0: only at the end)
    fix=dict(                  # FixRes: fine-tune only the classifier at the test resolution, test preprocessing
        enabled=False,
        epochs=2,
        lr=0.01,
        batch_size=0,          # 0 = data.batch_size
        bn_stats=False,        # also re-estimate BatchNorm running statistics at the test resolution
    ),
)
RANGES = {
    "data": {"image_size": (0, None), "test_size": (0, None), "batch_size": (1, None), "eval_batch_size": (0, None),
             "mixup": (0.0, None), "crop_scale": (0.0, 1.0)},
    "optim": {"lr": (0.0, None), "base_batch": (1, None), "head_mult": (0.0, None), "weight_decay": (0.0, None),
              "default_weight_decay": (0.0, None), "momentum": (0.0, 1.0), "clip_grad_norm": (0.0, None)},
    "loss": {"label_smoothing": (0.0, 1.0)},
    "schedule": {"epochs": (0, None), "warmup_epochs": (0.0, None), "warmup_factor": (0.0, 1.0),
                 "min_factor": (0.0, 1.0)},
    "eval": {"every_epochs": (0, None)},
    "fix": {"epochs": (0, None), "lr": (0.0, None), "batch_size": (0, None)},
}
# Flags on top of -c/-o: (flag, config key, type, help). --out-dir and --restart come with every trainer.
FLAGS = [
    ("--dataset", "dataset", str, f"one of {dataset_names()}"),
    ("--backbone", "backbone", str, "student artifact name or path, or timm:ARCH"),
    ("--data-root", "data.root", str, "dataset root (default $SSLD_DATA or ./data)"),
    ("--split", "data.split", str, "final (fit train+val, report test) or select (fit train, report val)"),
    ("--lr", "optim.lr", float, "base learning rate (the classifier's)"),
    ("--lr-mult", "optim.lr_mult", str, "5 per-stage multipliers, e.g. 0.1,0.1,0.2,0.2,0.3 "
                                        "(default: the artifact's recommended.transfer)"),
    ("--weight-decay", "optim.weight_decay", float, "default: matched to the artifact's pretraining L2"),
    ("--epochs", "schedule.epochs", int, "fine-tuning epochs (0: only --fix)"),
    ("--batch-size", "data.batch_size", int, "global batch size"),
    ("--image-size", "data.image_size", int, "train resolution (default: the artifact's)"),
    ("--test-size", "data.test_size", int, "higher test resolution (default about 1.15x the train size)"),
    ("--label-smoothing", "loss.label_smoothing", float, "label smoothing epsilon in [0, 1]"),
    ("--mixup", "data.mixup", float, "mixup alpha (0: off)"),
    ("--amp", "run.amp", str, "off | bf16 | fp16"),
    ("--workers", "run.workers", int, "data loader processes"),
    ("--fix-epochs", "fix.epochs", int, "epochs of the Fix stage"),
    ("--fix-lr", "fix.lr", float, "learning rate of the Fix stage"),
    ("--device", "run.device", str, "auto | cpu | cuda"),
    ("--seed", "run.seed", int, "random seed"),
]
SWITCHES = [  # (flag, config key, value, help)
    ("--download", "data.download", True, "let torchvision download the dataset into the data root"),
    ("--channels-last", "run.channels_last", True, "channels_last memory format"),
    ("--fix", "fix.enabled", True, "then fine-tune the classifier at the test resolution (FixRes)"),
    ("--fix-bn", "fix.bn_stats", True, "with --fix: also re-estimate BatchNorm statistics"),
    ("--pretrained", "pretrained", True, "timm:ARCH only: start from timm's pretrained weights"),
    ("--no-progress", "run.progress", False, "no progress bar"),
]


# ---------------------------------------------------------------------------------------------------
# parse -> load -> check.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_trainer_args(parser)
    for flag, key, typ, text in FLAGS:
        parser.add_argument(flag, dest=key, type=typ, default=None, help=text,
                            metavar=flag[2:].upper().replace("-", "_"))
    for flag, key, value, text in SWITCHES:
        parser.add_argument(flag, dest=key, action="store_const", const=value, default=None, help=text)


def parse(argv=None, doc: str = "") -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m transfer.finetune", description=doc.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    add_arguments(parser)
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> Config:
    """The recipe (-c, else the dataset's recipe transfer/<dataset> when one exists), -o overrides, flags."""
    keys = {key for _, key, *_ in FLAGS + SWITCHES} | {"run.out_dir"}
    flags = {k: v for k, v in vars(args).items() if k in keys}
    path = args.config
    dataset = flags.get("dataset") or ""
    if path is None and dataset and "/" not in dataset and ":" not in dataset:
        try:
            path = resolve_recipe(f"transfer/{dataset}")
        except UserError:
            path = None   # no recipe for this dataset: the defaults
    return load_config(path, args.override, DEFAULTS, flags=flags)


def check(cfg: Config) -> Config:
    if not cfg.dataset:
        raise UserError(f"no dataset: pass --dataset ({dataset_names()})")
    if not cfg.backbone:
        raise UserError("no backbone: pass --backbone NAME|PATH|timm:ARCH (e.g. timm:resnet18d)")
    check_run(cfg)
    check_sections(cfg, RANGES)
    check_choice(cfg.data.split, "data.split", ("final", "select"))
    check_choice(cfg.schedule.kind, "schedule.kind", ("cosine", "step"))
    if cfg.fix.enabled and cfg.fix.epochs < 1:
        raise UserError(f"fix.epochs={cfg.fix.epochs}: needs at least 1 with --fix")
    if cfg.schedule.epochs == 0 and not cfg.fix.enabled:
        raise UserError("schedule.epochs=0: needs at least 1 (0 only with --fix)")
    if not 0 < cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction={cfg.data.val_fraction}: expected a fraction in (0, 1)")
    check_crop_scale(cfg.data.crop_scale)
    if cfg.optim.lr_mult is not None:
        parse_multipliers(cfg.optim.lr_mult)
    return cfg


def backbone_label(backbone: str) -> str:
    if backbone.startswith(TIMM_PREFIX):
        return "timm-" + backbone[len(TIMM_PREFIX):]
    return Path(backbone).stem or backbone


def dataset_label(dataset: str) -> str:
    """A folder name for a dataset: flowers102, or folder-NAME for folder:PATH/NAME."""
    return "folder-" + Path(dataset[len("folder:"):]).name if dataset.startswith("folder:") else dataset


def default_out(cfg) -> Path:
    return Path("runs") / "transfer" / dataset_label(cfg.dataset) / (
        backbone_label(cfg.backbone) + ("_select" if cfg.data.split == "select" else ""))
