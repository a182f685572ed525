"""SSLD knowledge distillation trainer: python -m distill.ssld -c configs/r50.yaml [-o key=value] [--resume].

Read top to bottom: the config schema (DEFAULTS), builders (data, student, teacher, optimizer), the
distillation step, one epoch, evaluation, checkpoints, then main(). With `teacher: null` and
`loss.kind: ce` the same trainer trains a teacher (or a labels-only baseline) from labels.

    torchrun --nproc_per_node 8 -m distill.ssld -c configs/r50.yaml       # one node, 8 GPUs
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

from distill.students import zoo
from distill.students.artifact import (IMAGENET_MEAN, IMAGENET_STD, build_meta, check_state_dict, default_test_size,
                                       read_meta, resolve_student, save_student, ssld_home)
from distill.core.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from distill.core.config import add_config_args, load_config
from distill.core.images import ListDataset, build_transform, collate_skipping
from distill.data import TrainStream, build_sources, infer_num_classes
from distill.core.distributed import all_reduce_sum, cleanup, init_distributed
from distill.core.errors import UserError, run_cli
from distill.losses import DistillLoss
from distill.core.metrics import evaluate_classifier
from distill.core.precision import AMP_DTYPES, autocast
from distill.core.runlog import RunLog, plot_metrics
from distill.core.schedule import build_scheduler, scale_lr
from distill.students.stages import stage_param_groups
from distill.teacher import build_teacher

# The config schema: every key a recipe may set, with its default. Recipes live in configs/*.yaml.
DEFAULTS = dict(
    out_dir="runs/ssld",
    seed=0,
    device="auto",                 # auto | cpu | cuda
    epochs=1,
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
        batch_size=64,             # per process
        workers=4,
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
    schedule=dict(kind="cosine", warmup_epochs=0.0, warmup_factor=0.0, min_factor=0.0,
                  milestones=[], gamma=0.1),  # milestones in epochs (kind: step)
    amp=None,                      # null | bf16 | fp16
    channels_last=False,
    compile=False,
    checkpoint=dict(every_iters=0, every_minutes=10.0),  # whichever comes first; 0 = off
    eval=dict(every_epochs=1, test_resolution=True),
    log=dict(every_iters=10, progress=True),
    export=dict(name=None, install=False),  # name: write OUT/NAME.safetensors; install: copy to $SSLD_HOME
)


def validate(cfg) -> None:
    """Checks across keys that the schema's type check cannot make."""
    if cfg.amp not in AMP_DTYPES:
        raise UserError(f"amp must be null, bf16 or fp16; got {cfg.amp!r}")
    if cfg.optim.name not in ("sgd", "adamw"):
        raise UserError(f"optim.name must be sgd or adamw; got {cfg.optim.name!r}")
    has_teacher = cfg.teacher is not None and bool(cfg.teacher.get("models"))
    if cfg.loss.kind != "ce" and not has_teacher:
        raise UserError(f"loss.kind {cfg.loss.kind!r} needs a teacher: set teacher.models, "
                        "or use loss.kind: ce to train from labels alone")
    if cfg.loss.kind == "ce" and has_teacher:
        raise UserError("loss.kind ce trains without a teacher; set teacher: null, or pick a distillation loss")
    if cfg.epochs < 1 or cfg.data.batch_size < 1:
        raise UserError(f"epochs and data.batch_size must be >= 1; got {cfg.epochs} and {cfg.data.batch_size}")
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
        if "meta" not in ckpt or "model" not in ckpt:
            raise UserError(f"{init} is not an ssld-kit trainer checkpoint (no 'meta'/'model' entries)")
        return ckpt["model"], ckpt["meta"], str(init)
    path = resolve_student(init)
    return load_file(str(path)), read_meta(path), str(path)


def build_train_loader(cfg, sources, dist):
    d = cfg.data
    transform = build_transform(d.augment, d.input_size, d.mean, d.std, d.crop_pct, d.crop_scale, d.hflip,
                                d.interpolation)
    stream = TrainStream(sources, transform, d.batch_size, d.epoch_samples, cfg.seed, dist.rank,
                         dist.world_size, d.shuffle_buffer)
    loader = DataLoader(stream, batch_size=d.batch_size, num_workers=d.workers, collate_fn=collate_skipping,
                        pin_memory=dist.device.type == "cuda", prefetch_factor=4 if d.workers else None)
    return stream, loader


def build_val_loaders(cfg, val_source, dist) -> dict:
    """{resolution: loader}: the train resolution and the test resolution, each rank its own shard."""
    d = cfg.data
    sizes = [d.input_size]
    if cfg.eval.test_resolution:
        sizes.append(d.test_input_size or default_test_size(d.input_size))
    loaders = {}
    for size in dict.fromkeys(sizes):
        transform = build_transform("test", size, d.mean, d.std, d.crop_pct, interpolation=d.interpolation)
        dataset = ListDataset(val_source.samples, transform)
        shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size))  # no padding: exact counts
        loaders[size] = DataLoader(shard, batch_size=d.batch_size, num_workers=d.workers,
                                   collate_fn=collate_skipping, pin_memory=dist.device.type == "cuda")
    return loaders


def build_optimizer(cfg, model, family: str, global_batch: int):
    o = cfg.optim
    lr = scale_lr(o.lr, global_batch, o.base_batch)
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
    return build_scheduler(optimizer, s.kind, total_steps=cfg.epochs * steps_per_epoch,
                           warmup_steps=int(round(s.warmup_epochs * steps_per_epoch)),
                           milestones=[int(m * steps_per_epoch) for m in s.milestones], gamma=s.gamma,
                           warmup_factor=s.warmup_factor, min_factor=s.min_factor)


# ---------------------------------------------------------------------------------------------------
# The distillation step.

def mixup_lambda(seed: int, step: int) -> float:
    """Function matching: a ~ Beta(1,1) (= uniform), a = max(a, 1-a); the same on every rank and on resume."""
    a = float(torch.rand((), generator=torch.Generator().manual_seed(seed * 1_000_003 + step)))
    return max(a, 1.0 - a)


def distill_step(model, teacher, criterion, images, labels, optimizer, scaler, *, amp_dtype=None,
                 clip_grad_norm: float = 0.0, mix: float | None = None):
    """One optimisation step. Teacher and student see the same (mixed) pixels. Returns (loss, parts), detached."""
    mix_labels = None
    if mix is not None:  # mix with the batch rolled by one, before either network sees it
        images = mix * images + (1.0 - mix) * images.roll(1, dims=0)
        mix_labels = (mix, labels.roll(1, dims=0))
    with autocast(images.device.type, amp_dtype):
        teacher_probs = teacher(images, criterion.teacher_temperature) if teacher is not None else None
        logits = model(images)
        loss, parts = criterion(logits, teacher_probs, labels, mix_labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), {k: v.detach() for k, v in parts.items()}


class NonFiniteLoss(UserError):
    pass


def train_one_epoch(ctx, epoch: int, start_batch: int):
    """Train over this epoch's plan from `start_batch`; checkpoints every N iterations or minutes."""
    cfg, dist, model = ctx["cfg"], ctx["dist"], ctx["model"]
    stream, loader = ctx["stream"], ctx["loader"]
    stream.set_epoch(epoch, start_batch)
    model.train()
    amp_dtype = AMP_DTYPES[cfg.amp]
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    steps_per_epoch = stream.batches_per_epoch
    bar = None
    if dist.is_main and cfg.log.progress:
        from tqdm import tqdm
        bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="it", dynamic_ncols=True, file=sys.stderr)
    finite = torch.ones((), dtype=torch.bool, device=dist.device)
    running, n_running, t_log, images_seen = {}, 0, time.perf_counter(), 0
    batch_index = start_batch
    for images, labels, skipped in loader:
        if skipped:
            ctx["skipped"] += len(skipped)
            for s in skipped[:max(0, 5 - ctx["skipped_reported"])]:
                print(f"warning: skipped unreadable image {s.reason}", file=sys.stderr)
            ctx["skipped_reported"] += len(skipped)
        if len(images) == 0:  # every image of this batch was unreadable
            if dist.world_size > 1:
                raise UserError("a whole batch of training images was unreadable; the ranks cannot stay in step. "
                                "Check the data (the warnings above name the files)")
            batch_index += 1
            continue
        images = images.to(dist.device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(dist.device, non_blocking=True)
        step = ctx["step"]
        mix = mixup_lambda(cfg.seed, step) if cfg.data.mixup else None
        loss, parts = distill_step(model, ctx["teacher"], ctx["criterion"], images, labels, ctx["optimizer"],
                                   ctx["scaler"], amp_dtype=amp_dtype, clip_grad_norm=cfg.optim.clip_grad_norm,
                                   mix=mix)
        finite &= torch.isfinite(loss)
        ctx["scheduler"].step()
        ctx["step"] = step + 1
        batch_index += 1
        images_seen += len(images)
        for k, v in {"loss": loss, **parts}.items():
            running[k] = running.get(k, 0.0) + v
        n_running += 1
        last = batch_index == steps_per_epoch
        if ctx["step"] % cfg.log.every_iters == 0 or last:
            check_finite(finite, ctx, epoch, batch_index, across_ranks=True)
            elapsed = time.perf_counter() - t_log
            scalars = {k: float(v) / n_running for k, v in running.items()}
            group = ctx["optimizer"].param_groups[0]
            scalars.update(lr=group["lr"] / group["lr_mult"], epoch=epoch + batch_index / steps_per_epoch,
                           img_per_s=images_seen * dist.world_size / max(elapsed, 1e-9))
            ctx["log"].log(ctx["step"], **scalars)
            if bar is not None:
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['img_per_s']:.0f}",
                                lr=f"{scalars['lr']:.3g}")
            running, n_running, t_log, images_seen = {}, 0, time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if checkpoint_due(cfg, ctx) and not last:
            if dist.is_main:  # the saving rank makes sure it saves good weights
                check_finite(finite, ctx, epoch, batch_index)
            save_training_state(ctx, epoch, batch_index)
    if bar is not None:
        bar.close()
    check_finite(finite, ctx, epoch, batch_index, across_ranks=True)


def check_finite(finite, ctx, epoch, batch_index, across_ranks=False):
    """Raise NonFiniteLoss if any loss since the start of the epoch was NaN/inf.

    At log intervals (the same step on every rank) the flag is summed over ranks so all stop together.
    Before a checkpoint (rank 0's decision alone) the weights are checked too: a NaN gradient from
    another rank reaches them through the all-reduce before rank 0's own loss shows it.
    """
    bad = ~finite
    if across_ranks and ctx["dist"].world_size > 1:
        bad = all_reduce_sum(bad.float()) > 0
    elif not across_ranks:
        bad = bad | ~torch.stack([p.detach().isfinite().all() for p in ctx["model"].parameters()]).all()
    if bool(bad):
        path = ctx["ckpt_path"]
        last = f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint was written yet"
        raise NonFiniteLoss(f"loss became NaN or inf in epoch {epoch + 1} before iteration {batch_index} "
                            f"(global step {ctx['step']}); stopped. {last}; lower optim.lr, set "
                            "optim.clip_grad_norm or use amp: bf16 instead of fp16, then --resume")


def checkpoint_due(cfg, ctx) -> bool:
    c = cfg.checkpoint
    by_iters = c.every_iters > 0 and ctx["step"] % c.every_iters == 0
    by_time = c.every_minutes > 0 and time.monotonic() - ctx["ckpt_time"] >= 60 * c.every_minutes
    return by_iters or by_time


# ---------------------------------------------------------------------------------------------------
# Evaluation, checkpoints, export.

def evaluate(ctx) -> dict:
    cfg, model = ctx["cfg"], ctx["model"]
    out = {}
    for size, loader in ctx["val_loaders"].items():
        r = evaluate_classifier(model, loader, ctx["dist"].device, ctx["num_classes"], AMP_DTYPES[cfg.amp])
        tag = "" if size == cfg.data.input_size else "_test_res"
        out.update({f"top1{tag}": r["top1"], f"top5{tag}": r["top5"]})
    return out


def unwrap(model) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, DistributedDataParallel) else model


def save_training_state(ctx, epoch: int, batch_index: int) -> None:
    """Everything exact resume needs: weights, optimiser, scheduler, scaler, data position, RNG."""
    ctx["ckpt_time"] = time.monotonic()
    if not ctx["dist"].is_main:
        return
    state = dict(model=unwrap(ctx["model"]).state_dict(), optimizer=ctx["optimizer"].state_dict(),
                 scheduler=ctx["scheduler"].state_dict(), scaler=ctx["scaler"].state_dict(),
                 epoch=epoch, batch=batch_index, step=ctx["step"], rng=capture_rng(),
                 skipped=ctx["skipped"], results=ctx["results"], meta=ctx["meta"], config=ctx["cfg"].to_dict())
    save_checkpoint(ctx["ckpt_path"], state)


def resume_training_state(ctx, path) -> tuple[int, int]:
    state = load_checkpoint(path)
    if state.get("meta", {}).get("arch") != ctx["meta"]["arch"]:
        raise UserError(f"--resume {path}: checkpoint is for {state.get('meta', {}).get('arch')!r}, "
                        f"the config builds {ctx['meta']['arch']!r}")
    unwrap(ctx["model"]).load_state_dict(state["model"])
    ctx["optimizer"].load_state_dict(state["optimizer"])
    ctx["scheduler"].load_state_dict(state["scheduler"])
    ctx["scaler"].load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    ctx["step"], ctx["results"] = state["step"], state["results"]
    ctx["skipped"] = state["skipped"] if ctx["dist"].is_main else 0
    return state["epoch"], state["batch"]


def export_student(ctx) -> Path:
    cfg, meta = ctx["cfg"], dict(ctx["meta"])
    name = cfg.export.name or Path(cfg.out_dir).name
    final = ctx["results"][-1] if ctx["results"] else {}
    teacher = list(cfg.teacher.models) if cfg.teacher else None
    meta["name"] = name
    meta["pretrain"] = dict(
        meta.get("pretrain", {}), weight_decay=cfg.optim.weight_decay, epochs=cfg.epochs,
        teacher=teacher, loss=cfg.loss.to_dict(), data=[dict(s) for s in cfg.data.train],
        optimizer=cfg.optim.name, lr=cfg.optim.lr, batch_size=ctx["global_batch"], augment=cfg.data.augment,
        mixup=cfg.data.mixup, top1=final.get("top1"), top5=final.get("top5"),
        top1_test_res=final.get("top1_test_res"), top5_test_res=final.get("top5_test_res"),
        skipped_images=ctx["skipped"])
    path = save_student(Path(cfg.out_dir) / f"{name}.safetensors", unwrap(ctx["model"]), meta)
    if cfg.export.install:
        ssld_home().mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ssld_home() / path.name)
    return path


# ---------------------------------------------------------------------------------------------------
# main: parse, build, run.

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m distill.ssld", description=__doc__.splitlines()[0])
    add_config_args(parser, required=True)
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                        help="continue from OUT_DIR/checkpoint.pt (or the given checkpoint) exactly")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.override, DEFAULTS)
    validate(cfg)
    dist = init_distributed(cfg.device)
    try:
        run(cfg, dist, args.resume)
    finally:
        cleanup()


def run(cfg, dist, resume=None):
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    out_dir = Path(cfg.out_dir)
    # Data sources first: a missing path or an empty source fails before any model is built.
    sources = build_sources(cfg.data.train, cfg.data.root)
    val_source = build_sources([cfg.data.val], cfg.data.root)[0]
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
    global_batch = cfg.data.batch_size * dist.world_size
    optimizer, lr = build_optimizer(cfg, model, family, global_batch)
    scheduler = build_lr_scheduler(cfg, optimizer, stream.batches_per_epoch)

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(dist.device, memory_format=memory_format)
    if teacher is not None:
        teacher.to(dist.device, memory_format)
    if dist.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")

    meta = build_meta(arch_name, num_classes, model=unwrap(model),
                      preprocessing=dict(input_size=cfg.data.input_size,
                                         test_input_size=cfg.data.test_input_size
                                         or default_test_size(cfg.data.input_size),
                                         crop_pct=cfg.data.crop_pct, mean=list(cfg.data.mean),
                                         std=list(cfg.data.std), interpolation=cfg.data.interpolation))
    ctx = dict(cfg=cfg, dist=dist, model=model, teacher=teacher, criterion=criterion, stream=stream,
               loader=loader, val_loaders=val_loaders, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               num_classes=num_classes, meta=meta, global_batch=global_batch, step=0, skipped=0,
               skipped_reported=0, results=[], ckpt_path=out_dir / "checkpoint.pt", ckpt_time=time.monotonic())
    start_epoch, start_batch = 0, 0
    if not resume and ctx["ckpt_path"].is_file() and dist.is_main:
        print(f"warning: {ctx['ckpt_path']} exists and will be overwritten: this run starts from scratch "
              "(add --resume to continue it)", file=sys.stderr)
    if resume:
        path = ctx["ckpt_path"] if resume == "auto" else Path(resume)
        start_epoch, start_batch = resume_training_state(ctx, path)
        if dist.is_main:
            print(f"resumed from {path}: epoch {start_epoch + 1}, iteration {start_batch} (step {ctx['step']})",
                  file=sys.stderr)
    ctx["log"] = RunLog(out_dir, enabled=dist.is_main, resume_step=ctx["step"] if resume else None)

    if dist.is_main:
        print(f"ssld: {arch_name} <- {'teacher ' + ', '.join(cfg.teacher.models) if teacher else 'labels'} "
              f"({cfg.loss.kind}); {num_classes} classes; {', '.join(s.describe() for s in sources)}; "
              f"{stream.batches_per_epoch} it/epoch x {cfg.epochs} epochs, global batch {global_batch}, "
              f"lr {lr:g}; {dist.world_size} process(es) on {dist.device}", file=sys.stderr)

    for epoch in range(start_epoch, cfg.epochs):
        if start_batch < stream.batches_per_epoch:
            train_one_epoch(ctx, epoch, start_batch)
        start_batch = 0
        skipped = int(all_reduce_sum(torch.tensor([ctx["skipped"]], device=dist.device))[0])
        ctx["skipped"] = skipped if dist.is_main else 0  # rank 0 carries the total from here on
        last = epoch + 1 == cfg.epochs
        if last or (cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0):
            results = dict(epoch=epoch + 1, **evaluate(ctx), skipped_images=skipped)
            ctx["results"].append(results)
            ctx["log"].log(ctx["step"], **{k: v for k, v in results.items() if k != "epoch"})
            if dist.is_main:
                print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in results.items() if k != "epoch"),
                      file=sys.stderr)
        save_training_state(ctx, epoch + 1, 0)

    ctx["log"].close()
    if dist.is_main:
        plot_metrics(out_dir / "metrics.csv", out_dir / "curves.png")
        path = export_student(ctx)
        print(f"exported {path}" + (f" (installed in {ssld_home()})" if cfg.export.install else ""))
    return ctx


if __name__ == "__main__":
    run_cli(main)
