"""Train Faster / Cascade R-CNN (FPN) with a student backbone on COCO or any COCO-format data.

    python -m detection.train --config configs/detection/faster_r50_vd_640.yaml --coco-root /data/coco
    python -m detection.train --backbone r50_vd_ssld --arch cascade --coco-root /data/coco
    torchrun --nproc_per_node 8 -m detection.train --config configs/detection/cascade_mv3_640.yaml ...
    python -m detection.train --config configs/detection/demo.yaml        # the demo data, CPU, minutes

Writes OUT/checkpoint.pt (every train.checkpoint_period iterations and at the end; --resume continues from
it exactly), OUT/model_final.pt, OUT/metrics.csv + OUT/tb/ (TensorBoard), OUT/loss_curve.png,
OUT/metrics.json (final COCO box AP) and a few OUT/predictions/*.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from distill.students.artifact import load_student
from distill.core.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from distill.core.config import add_config_args
from distill.core.distributed import all_reduce_sum, barrier, cleanup, init_distributed, is_distributed
from distill.core.errors import UserError, run_cli
from distill.core.precision import autocast
from distill.core.runlog import RunLog, plot_metrics
from distill.core.schedule import build_scheduler, scale_lr

from .backbone import default_weight_decay
from .coco_eval import METRICS, evaluate, gather_lists
from .config import load_detection_config
from .data import TrainSampler, eval_loader, load_coco, split_paths, train_loader
from .model import build_detector, param_groups
from .predict import predict_images

CHECKPOINT, FINAL = "checkpoint.pt", "model_final.pt"
PREDICTION_SAMPLES = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m detection.train", description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--backbone", help="student artifact name or path, or timm:ARCH (model.backbone)")
    parser.add_argument("--arch", choices=("faster", "cascade"), help="model.arch")
    parser.add_argument("--coco-root", help="folder with train2017/, val2017/, annotations/ (data.coco_root)")
    parser.add_argument("--out-dir", help="run folder (train.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    return parser.parse_args(argv)


def config_from_args(args) -> dict:
    flags = {"model.backbone": args.backbone, "model.arch": args.arch, "data.coco_root": args.coco_root,
             "train.out_dir": args.out_dir}
    overrides = list(args.override) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    return load_detection_config(args.config, overrides)


def build_model(cfg: dict, num_classes: int):
    """The detector with the student's weights, and the metadata a checkpoint needs to rebuild it."""
    m = cfg["model"]
    trunk, meta = load_student(m["backbone"], pretrained=m["pretrained"])
    model = build_detector(m, num_classes, trunk, meta)
    resolved = dict(m, frozen_bn=model.backbone.frozen_bn, multipliers=model.backbone.multipliers)
    return model, meta, resolved


def build_optimizer(cfg: dict, model, meta: dict):
    o = cfg["optim"]
    lr = scale_lr(o["lr"], o["batch_size"], o["base_batch"])
    wd = o["weight_decay"] if o["weight_decay"] is not None else default_weight_decay(meta)
    optimizer = torch.optim.SGD(param_groups(model, lr, wd), lr=lr, momentum=o["momentum"])
    scheduler = build_scheduler(optimizer, "step", o["iterations"], o["warmup_iters"], milestones=o["steps"],
                                gamma=o["gamma"], warmup_factor=o["warmup_factor"])
    return optimizer, scheduler, lr, wd


def main(argv=None):
    args = parse_args(argv)
    cfg = config_from_args(args)
    out = Path(cfg["train"]["out_dir"])
    resume_path = out / CHECKPOINT
    if resume_path.exists() and not args.resume:
        raise UserError(f"{out} already holds a run ({resume_path}); pass --resume to continue it "
                        "or choose another --out-dir")
    dist = init_distributed(cfg["train"]["device"])
    o, t = cfg["optim"], cfg["train"]
    if o["batch_size"] % dist.world_size:
        raise UserError(f"optim.batch_size={o['batch_size']} must divide over {dist.world_size} processes")
    torch.manual_seed(t["seed"] + dist.rank)

    # Build: data (validated up front), model, optimizer, schedule.
    train_split = load_coco(*split_paths(cfg["data"], "train"))
    val_split = load_coco(*split_paths(cfg["data"], "val"), category_ids=train_split.category_ids)
    model, meta, model_cfg = build_model(cfg, len(train_split.category_ids))
    model.to(dist.device)
    if dist.distributed and not model_cfg["frozen_bn"] and dist.device.type == "cuda":  # SyncBN is GPU-only
        from timm.layers import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    optimizer, scheduler, lr, wd = build_optimizer(cfg, model, meta)
    amp = o["amp"]
    amp_dtype = (torch.float16 if dist.device.type == "cuda" else torch.bfloat16) if amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dist.device.type == "cuda")

    start_iter, skipped = 0, 0
    if args.resume and resume_path.exists():
        ckpt = load_checkpoint(resume_path, map_location=dist.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["ranks"]) != dist.world_size:
            raise UserError(f"{resume_path} was written by {len(ckpt['ranks'])} process(es); resume it with as many "
                            f"(now {dist.world_size}) so that every process continues its own data stream")
        start_iter, skipped = ckpt["iteration"], ckpt["ranks"][dist.rank]["skipped"]
        restore_rng(ckpt["ranks"][dist.rank]["rng"])
    per_rank = o["batch_size"] // dist.world_size
    sampler = TrainSampler(len(train_split), t["seed"], cfg["data"]["hflip"], dist.rank, dist.world_size,
                           start=start_iter * per_rank)
    loader = train_loader(train_split, per_rank, cfg["data"]["workers"], sampler)
    val_loader = eval_loader(val_split, t["eval_batch_size"], cfg["data"]["workers"], dist.rank, dist.world_size)
    ddp = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None) \
        if dist.distributed else model

    def save(path, iteration, skipped, full=True):
        ranks = gather_lists([dict(rng=capture_rng(), skipped=skipped)])  # each rank's own RNG and data stream
        if dist.is_main:
            state = dict(model=model.state_dict(), iteration=iteration, config=cfg, model_config=model_cfg,
                         backbone_meta=meta, classes=train_split.class_names, category_ids=train_split.category_ids)
            if full:
                state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                             scaler=scaler.state_dict(), ranks=ranks)
            save_checkpoint(path, state)
        barrier()

    def run_eval(iteration):
        broadcast_buffers(model)
        metrics = evaluate(model, val_loader, dist.device, val_split, amp_dtype)
        if dist.is_main:
            log.log(iteration, **{k: metrics[k] for k in METRICS})
            tqdm.write(f"iter {iteration}: " + "  ".join(f"{k} {metrics[k]:.1f}" for k in METRICS)
                       + f"  ({metrics['images']} images" + (f", {metrics['corrupt']} corrupt skipped)" if metrics["corrupt"] else ")"))
        return metrics

    log = RunLog(out, enabled=dist.is_main, resume_step=start_iter if start_iter else None)
    if dist.is_main:
        print(f"{cfg['model']['arch']} R-CNN, backbone {cfg['model']['backbone']} ({meta['arch']}), "
              f"{'FrozenBN' if model_cfg['frozen_bn'] else 'trainable BN'}, multipliers {model_cfg['multipliers']}; "
              f"{len(train_split)} train / {len(val_split)} val images, {len(train_split.category_ids)} classes; "
              f"batch {o['batch_size']} on {dist.world_size} x {dist.device.type}, lr {lr:g}, weight decay {wd:g}")
    skipped = train_loop(ddp, optimizer, scheduler, scaler, loader, cfg, dist, log, start_iter, skipped, amp_dtype,
                         run_eval, save)
    metrics = run_eval(o["iterations"])
    save(out / CHECKPOINT, o["iterations"], skipped)
    save(out / FINAL, o["iterations"], skipped, full=False)
    skipped = int(all_reduce_sum(torch.tensor(skipped, device=dist.device)))
    if dist.is_main:
        log.close()
        plot_metrics(out / "metrics.csv", out / "loss_curve.png")
        (out / "metrics.json").write_text(json.dumps(dict(metrics, iterations=o["iterations"],
                                                          corrupt_train_images_skipped=skipped), indent=2))
        samples = [str(p) for p in val_split.paths[:PREDICTION_SAMPLES]]
        predict_images(model, samples, out / "predictions", train_split.class_names, dist.device)
        print(f"done: AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}; {out / FINAL}, {out / 'loss_curve.png'}, "
              f"{out / 'predictions'}/")
    cleanup()
    return metrics


def broadcast_buffers(model) -> None:
    """Rank 0's BatchNorm statistics on every rank: DDP syncs buffers at the start of each training forward,
    so after the last one each rank holds its own, and a sharded evaluation would mix them."""
    if is_distributed():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


def train_loop(model, optimizer, scheduler, scaler, loader, cfg, dist, log, start_iter, skipped, amp_dtype,
               run_eval, save) -> int:
    """SGD iterations start_iter..iterations: forward, backward, step, per-iteration lr; log, eval, checkpoint.
    Returns the number of training images that failed to decode (skipped)."""
    o, t = cfg["optim"], cfg["train"]
    total, device = o["iterations"], dist.device
    out = Path(t["out_dir"])
    model.train()
    bar = tqdm(total=total, initial=start_iter, disable=not dist.is_main, dynamic_ncols=True, unit="it")
    window = dict(images=0, start=time.perf_counter(), losses={}, count=0)
    iteration = start_iter
    for images, targets, bad in loader:
        if iteration >= total:
            break
        skipped += len(bad)
        if bad and dist.is_main:
            tqdm.write(f"skipped {len(bad)} image(s) that do not decode: {', '.join(bad[:3])}")
        if images:
            images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
            targets = [{k: v.to(device) for k, v in tgt.items()} for tgt in targets]
            with autocast(device.type, amp_dtype):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}: "
                                         + ", ".join(f"{k} {v.item():.3g}" for k, v in losses.items())
                                         + "; lower optim.lr or raise optim.warmup_iters")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            for k, v in losses.items():
                window["losses"][k] = window["losses"].get(k, 0.0) + v.item()
            window["count"] += 1
        scheduler.step()
        iteration += 1
        window["images"] += len(images) * dist.world_size
        bar.update(1)

        if iteration % t["log_period"] == 0 or iteration == total:
            elapsed = time.perf_counter() - window["start"]
            names = sorted(window["losses"])
            stats = torch.tensor([window["losses"][k] for k in names] + [window["count"], skipped],
                                 dtype=torch.float64, device=device)
            stats = all_reduce_sum(stats).tolist()
            mean = {k: v / max(stats[-2], 1) for k, v in zip(names, stats)}
            ips = window["images"] / max(elapsed, 1e-9)
            lr = optimizer.param_groups[-1]["lr"]
            log.log(iteration, loss=sum(mean.values()), **mean, lr=lr, img_per_s=ips, skipped_images=stats[-1])
            bar.set_postfix(loss=f"{sum(mean.values()):.3f}", lr=f"{lr:.3g}", img_s=f"{ips:.1f}")
            window = dict(images=0, start=time.perf_counter(), losses={}, count=0)
        if t["checkpoint_period"] and iteration % t["checkpoint_period"] == 0 and iteration < total:
            save(out / CHECKPOINT, iteration, skipped)
        if t["eval_period"] and iteration % t["eval_period"] == 0 and iteration < total:
            run_eval(iteration)
            model.train()
            window["start"] = time.perf_counter()
    bar.close()
    return skipped


if __name__ == "__main__":
    run_cli(main)
