"""Train Faster / Cascade R-CNN (FPN) with a student backbone on COCO or any COCO-format data.

    python -m detection.train -c configs/detection/faster_r50_vd_640.yaml --coco-root /data/coco
    python -m detection.train --backbone r50_vd_ssld --arch cascade --coco-root /data/coco
    torchrun --nproc_per_node 8 -m detection.train -c configs/detection/cascade_mv3_640.yaml ...
    python -m detection.train -c configs/detection/demo.yaml        # the demo data, CPU, minutes
    python -m detection.train -c detection/demo --engine detectron2  # the same recipe through detectron2

Runs on distill.core.engine: rerun the same command to resume exactly (a larger schedule.iterations
continues a finished run), --restart to start over. Writes OUT/checkpoint.pt, OUT/model_final.pt (what
detection.eval / detection.predict read), OUT/metrics.csv + OUT/tb/, OUT/loss_curve.png, OUT/metrics.json
(final COCO box AP) and a few OUT/predictions/*.png.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed

from distill.core.checkpoint import save_checkpoint
from distill.core.config import Config, add_trainer_args, load_config
from distill.core.distributed import DistInfo, barrier, cleanup, init_distributed, is_distributed, per_rank_batch
from distill.core.engine import Engine, StepOutput, Task
from distill.core.errors import ArgumentParser, run_cli
from distill.core.precision import AMP_DTYPES
from distill.core.runlog import plot_metrics
from distill.core.schedule import scale_lr
from distill.core.trainer_kit import RUN_SAFE_ON_RESUME, lr_scheduler, seed_for_build, seed_for_training
from distill.students.artifact import load_student
from distill.students.decay import weight_decay_for

from .backbone import DEFAULT_WEIGHT_DECAY
from .coco_eval import METRICS, evaluate
from .config import DEFAULTS, check
from .data import CocoSplit, TrainSampler, eval_loader, load_coco, split_paths, train_loader
from .model import build_detector, param_groups
from .predict import predict_images

FINAL = "model_final.pt"
ENGINES = ("kit", "detectron2")
PREDICTION_SAMPLES = 4


# ---------------------------------------------------------------------------------------------------
# parse -> load (-> check: detection.config, with the schema).

def parse(argv=None):
    parser = ArgumentParser(prog="python -m detection.train", description=__doc__.splitlines()[0])
    add_trainer_args(parser)
    parser.add_argument("--backbone", help="student artifact name or path, or timm:ARCH (model.backbone)")
    parser.add_argument("--arch", choices=("faster", "cascade"), help="model.arch")
    parser.add_argument("--coco-root", help="folder with train2017/, val2017/, annotations/ (data.coco_root)")
    parser.add_argument("--engine", choices=ENGINES, default="kit",
                        help="kit: this package's detector; detectron2: the same recipe through detectron2's "
                             "trainer, evaluator and checkpointer (needs detectron2 installed)")
    return parser.parse_args(argv)


def load(args) -> Config:
    flags = {"model.backbone": args.backbone, "model.arch": args.arch, "data.coco_root": args.coco_root,
             "run.out_dir": getattr(args, "run.out_dir")}
    return load_config(args.config, args.override, DEFAULTS, flags=flags)


# ---------------------------------------------------------------------------------------------------
# build.

@dataclass
class DetectionData:
    train: CocoSplit
    val: CocoSplit


def load_data(cfg) -> DetectionData:
    """Both splits read and checked (val's categories mapped onto train's) before any model is built."""
    train = load_coco(*split_paths(cfg.data, "train"))
    return DetectionData(train, load_coco(*split_paths(cfg.data, "val"), category_ids=train.category_ids))


def build_model(cfg, num_classes: int):
    """The detector with the student's weights, its metadata, and the resolved `model` section a checkpoint
    needs to rebuild it."""
    m = cfg.model
    trunk, meta = load_student(m.backbone, pretrained=m.pretrained)
    model = build_detector(m, num_classes, trunk, meta, channels_last=cfg.run.channels_last)
    resolved = dict(m.to_dict(), frozen_bn=model.backbone.frozen_bn, multipliers=model.backbone.multipliers)
    return model, meta, resolved


def build_optimizer(cfg, model, meta: dict):
    """(SGD over the stage groups, its lr, its weight decay, where the decay came from)."""
    o = cfg.optim
    lr = scale_lr(o.lr, cfg.data.batch_size, o.base_batch)
    wd, why = weight_decay_for(o.weight_decay, meta, DEFAULT_WEIGHT_DECAY, "-o optim.weight_decay=VALUE")
    return torch.optim.SGD(param_groups(model, lr, wd), lr=lr, momentum=o.momentum), lr, wd, why


class DetectionTask(Task):
    """One epoch of `schedule.iterations` batches from an endless, resumable sampler."""
    safe_on_resume = RUN_SAFE_ON_RESUME + ("optim.lr", "optim.clip_grad_norm", "schedule.iterations")
    advice = ("optim.lr", "optim.clip_grad_norm")

    def __init__(self, cfg, dist: DistInfo, data: DetectionData):
        self.cfg, self.dist, self.data = cfg, dist, data
        self.model, self.meta, self.model_cfg = build_model(cfg, len(data.train.category_ids))
        self.model.to(dist.device)
        if dist.distributed and not self.model_cfg["frozen_bn"] and dist.device.type == "cuda":  # SyncBN: GPU only
            from timm.layers import convert_sync_batchnorm
            self.model = convert_sync_batchnorm(self.model)
        self.optimizer, self.lr, _, self.decay_note = build_optimizer(cfg, self.model, self.meta)
        self.scheduler = lr_scheduler(self.optimizer, dict(cfg.schedule, kind="step"))
        self.per_rank, self.global_batch = per_rank_batch(cfg.data.batch_size, dist), cfg.data.batch_size
        self.epochs, self.steps_per_epoch = 1, cfg.schedule.iterations
        self.clip_grad_norm = cfg.optim.clip_grad_norm
        self.val_loader = eval_loader(data.val, max(cfg.data.eval_batch_size // dist.world_size, 1),
                                      cfg.run.workers, dist)
        self.amp_dtype = AMP_DTYPES[cfg.run.amp]

    def describe(self) -> str:
        m, d = self.model_cfg, self.data
        return (f"{m['arch']} R-CNN, backbone {m['backbone']} ({self.meta['arch']}), "
                f"{'FrozenBN' if m['frozen_bn'] else 'trainable BN'}, multipliers {m['multipliers']}; "
                f"{len(d.train)} train / {len(d.val)} val images, {len(d.train.category_ids)} classes; "
                f"batch {self.global_batch} on {self.dist.world_size} x {self.dist.device.type}, lr {self.lr:g}; "
                f"weight decay {self.decay_note}")

    def batches(self, epoch: int, start: int):
        sampler = TrainSampler(len(self.data.train), self.cfg.run.seed, self.cfg.data.hflip,
                               self.dist.rank, self.dist.world_size, start=start * self.per_rank)
        return train_loader(self.data.train, self.per_rank, self.cfg.run.workers, sampler)

    def forward(self, net, batch, state) -> StepOutput:
        images, targets, _ = batch
        device = self.dist.device
        images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = net(images, targets)
        return StepOutput(sum(losses.values()), {k: v.detach() for k, v in losses.items()}, len(images))

    def evaluate(self, net) -> dict:
        broadcast_buffers(self.model)
        metrics = evaluate(self.model, self.val_loader, self.dist.device, self.data.val, self.amp_dtype)
        return {k: metrics[k] for k in (*METRICS, "images", "corrupt")}


def broadcast_buffers(model) -> None:
    """Rank 0's BatchNorm statistics on every rank: DDP syncs buffers at the start of each training forward,
    so after the last one each rank holds its own, and a sharded evaluation would mix them."""
    if is_distributed():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


# ---------------------------------------------------------------------------------------------------
# run.

def main(argv=None):
    args = parse(argv)
    cfg = check(load(args))
    dist = init_distributed(cfg.run.device)
    try:
        if args.engine == "detectron2":   # imported here: detection.train must work without detectron2
            from .detectron2.train import train as train_detectron2
            return train_detectron2(cfg, dist, Path(cfg.run.out_dir), args.restart)
        return run(cfg, dist, args.restart)
    finally:
        cleanup()


def run(cfg: Config, dist: DistInfo, restart: bool = False) -> dict:
    """Build the task, train it on the engine (resuming), then write the final model, curves, metrics and a
    few predicted images. Returns the final COCO box metrics."""
    out = Path(cfg.run.out_dir)
    seed_for_build(cfg.run.seed)
    data = load_data(cfg)
    if dist.is_main:
        print(f"train: {data.train.summary()}\nval: {data.val.summary()}", file=sys.stderr)
    task = DetectionTask(cfg, dist, data)
    seed_for_training(cfg.run.seed, dist)
    engine = Engine(task, cfg, dist, restart=restart)
    engine.say(task.describe())
    state = engine.run()
    metrics = state.results[-1]
    skipped = engine.skipped_total()
    if dist.is_main:
        train_split = data.train
        save_checkpoint(out / FINAL, dict(model=task.model.state_dict(), iteration=state.iteration,
                                          config=cfg.to_dict(), model_config=task.model_cfg, backbone_meta=task.meta,
                                          classes=train_split.class_names, category_ids=train_split.category_ids))
        plot_metrics(out / "metrics.csv", out / "loss_curve.png")
        (out / "metrics.json").write_text(json.dumps(dict(metrics, corrupt_train_images_skipped=skipped), indent=2))
        samples = [str(p) for p in data.val.paths[:PREDICTION_SAMPLES]]
        predict_images(task.model, samples, out / "predictions", train_split.class_names, dist.device)
        print(f"done: AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}; {out / FINAL}, {out / 'loss_curve.png'}, "
              f"{out / 'predictions'}/")
    barrier()
    return metrics


if __name__ == "__main__":
    run_cli(main)
