"""Train Faster / Cascade R-CNN (FPN) with a student backbone on COCO or any COCO-format data.

    python -m detection.train -c configs/detection/faster_r50_vd_640.yaml --coco-root /data/coco
    python -m detection.train --backbone r50_vd_ssld --arch cascade --coco-root /data/coco
    torchrun --nproc_per_node 8 -m detection.train -c configs/detection/cascade_mv3_640.yaml ...
    python -m detection.train -c configs/detection/demo.yaml        # the demo data, CPU, minutes

Runs on distill.core.engine: rerun the same command to resume exactly (a larger schedule.iterations
continues a finished run), --restart to start over. Writes OUT/checkpoint.pt, OUT/model_final.pt (what
detection.eval / detection.predict read), OUT/metrics.csv + OUT/tb/, OUT/loss_curve.png, OUT/metrics.json
(final COCO box AP) and a few OUT/predictions/*.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed

from distill.core.checkpoint import save_checkpoint
from distill.core.config import Config, add_trainer_args
from distill.core.distributed import all_reduce_sum, barrier, cleanup, init_distributed, is_distributed, per_rank_batch
from distill.core.engine import Engine, StepOutput, Task
from distill.core.errors import ArgumentParser, run_cli
from distill.core.precision import AMP_DTYPES
from distill.core.runlog import plot_metrics
from distill.core.schedule import build_scheduler, scale_lr
from distill.students.artifact import load_student

from .backbone import matched_decay
from .coco_eval import METRICS, evaluate
from .config import load_detection_config
from .data import TrainSampler, eval_loader, load_coco, split_paths, train_loader
from .model import build_detector, param_groups
from .predict import predict_images

FINAL = "model_final.pt"
PREDICTION_SAMPLES = 4


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m detection.train", description=__doc__.splitlines()[0])
    add_trainer_args(parser)
    parser.add_argument("--backbone", help="student artifact name or path, or timm:ARCH (model.backbone)")
    parser.add_argument("--arch", choices=("faster", "cascade"), help="model.arch")
    parser.add_argument("--coco-root", help="folder with train2017/, val2017/, annotations/ (data.coco_root)")
    return parser.parse_args(argv)


def config_from_args(args) -> dict:
    flags = {"model.backbone": args.backbone, "model.arch": args.arch, "data.coco_root": args.coco_root,
             "run.out_dir": getattr(args, "run.out_dir")}
    return load_detection_config(args.config, args.override, flags)


def build_model(cfg: dict, num_classes: int):
    """The detector with the student's weights, and the metadata a checkpoint needs to rebuild it."""
    m = cfg["model"]
    trunk, meta = load_student(m["backbone"], pretrained=m["pretrained"])
    model = build_detector(m, num_classes, trunk, meta, channels_last=cfg["run"]["channels_last"])
    resolved = dict(m, frozen_bn=model.backbone.frozen_bn, multipliers=model.backbone.multipliers)
    return model, meta, resolved


def build_optimizer(cfg: dict, model, meta: dict):
    o, s = cfg["optim"], cfg["schedule"]
    lr = scale_lr(o["lr"], cfg["data"]["batch_size"], o["base_batch"])
    wd, why = (o["weight_decay"], f"{o['weight_decay']:g} (given)") if o["weight_decay"] is not None else \
        matched_decay(meta)
    optimizer = torch.optim.SGD(param_groups(model, lr, wd), lr=lr, momentum=o["momentum"])
    scheduler = build_scheduler(optimizer, "step", s["iterations"], s["warmup_iters"], milestones=s["steps"],
                                gamma=s["gamma"], warmup_factor=s["warmup_factor"])
    return optimizer, scheduler, lr, wd, why


class DetectionTask(Task):
    """One epoch of `schedule.iterations` batches from an endless, resumable sampler."""

    def __init__(self, cfg, dist, model, optimizer, scheduler, train_split, val_split):
        self.cfg, self.dist, self.model = cfg, dist, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_split, self.val_split = train_split, val_split
        batch = cfg["data"]["batch_size"]
        self.per_rank, self.global_batch = per_rank_batch(batch, dist), batch
        self.epochs, self.steps_per_epoch = 1, cfg["schedule"]["iterations"]
        self.val_loader = eval_loader(val_split, max(cfg["data"]["eval_batch_size"] // dist.world_size, 1),
                                      cfg["run"]["workers"], dist.rank, dist.world_size)
        self.amp_dtype = AMP_DTYPES[cfg["run"]["amp"]]

    def batches(self, epoch: int, start: int):
        sampler = TrainSampler(len(self.train_split), self.cfg["run"]["seed"], self.cfg["data"]["hflip"],
                               self.dist.rank, self.dist.world_size, start=start * self.per_rank)
        return train_loader(self.train_split, self.per_rank, self.cfg["run"]["workers"], sampler)

    def forward(self, net, batch, state) -> StepOutput:
        images, targets, _ = batch
        device = self.dist.device
        images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = net(images, targets)
        return StepOutput(sum(losses.values()), {k: v.detach() for k, v in losses.items()}, len(images))

    def evaluate(self, net) -> dict:
        broadcast_buffers(self.model)
        metrics = evaluate(self.model, self.val_loader, self.dist.device, self.val_split, self.amp_dtype)
        return {k: metrics[k] for k in (*METRICS, "images", "corrupt")}


def broadcast_buffers(model) -> None:
    """Rank 0's BatchNorm statistics on every rank: DDP syncs buffers at the start of each training forward,
    so after the last one each rank holds its own, and a sharded evaluation would mix them."""
    if is_distributed():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


def main(argv=None):
    args = parse_args(argv)
    cfg = config_from_args(args)
    out = Path(cfg["run"]["out_dir"])
    dist = init_distributed(cfg["run"]["device"])
    try:
        return train(cfg, dist, out, args.restart)
    finally:
        cleanup()


def train(cfg: dict, dist, out: Path, restart: bool) -> dict:
    torch.manual_seed(cfg["run"]["seed"] + dist.rank)
    # Build: data (validated up front), model, optimizer, schedule.
    train_split = load_coco(*split_paths(cfg["data"], "train"))
    val_split = load_coco(*split_paths(cfg["data"], "val"), category_ids=train_split.category_ids)
    if dist.is_main:
        print(f"train: {train_split.summary()}\nval: {val_split.summary()}", file=sys.stderr)
    model, meta, model_cfg = build_model(cfg, len(train_split.category_ids))
    model.to(dist.device)
    if dist.distributed and not model_cfg["frozen_bn"] and dist.device.type == "cuda":  # SyncBN is GPU-only
        from timm.layers import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    optimizer, scheduler, lr, _, decay_note = build_optimizer(cfg, model, meta)
    task = DetectionTask(cfg, dist, model, optimizer, scheduler, train_split, val_split)
    engine = Engine(task, Config.wrap(cfg["run"]), dist, cfg, restart=restart)
    engine.say(f"{cfg['model']['arch']} R-CNN, backbone {cfg['model']['backbone']} ({meta['arch']}), "
               f"{'FrozenBN' if model_cfg['frozen_bn'] else 'trainable BN'}, multipliers {model_cfg['multipliers']}; "
               f"{len(train_split)} train / {len(val_split)} val images, {len(train_split.category_ids)} classes; "
               f"batch {task.global_batch} on {dist.world_size} x {dist.device.type}, lr {lr:g}; "
               f"weight decay {decay_note}")
    state = engine.run()
    metrics = state.results[-1]
    skipped = int(all_reduce_sum(torch.tensor(engine.state.skipped, device=dist.device)))
    if dist.is_main:
        save_checkpoint(out / FINAL, dict(model=model.state_dict(), iteration=state.iteration, config=cfg,
                                          model_config=model_cfg, backbone_meta=meta,
                                          classes=train_split.class_names, category_ids=train_split.category_ids))
        plot_metrics(out / "metrics.csv", out / "loss_curve.png")
        (out / "metrics.json").write_text(json.dumps(dict(metrics, corrupt_train_images_skipped=skipped), indent=2))
        samples = [str(p) for p in val_split.paths[:PREDICTION_SAMPLES]]
        predict_images(model, samples, out / "predictions", train_split.class_names, dist.device)
        print(f"done: AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}; {out / FINAL}, {out / 'loss_curve.png'}, "
              f"{out / 'predictions'}/")
    barrier()
    return metrics


if __name__ == "__main__":
    run_cli(main)
