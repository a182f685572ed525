"""The kit's detection recipe through detectron2: `python -m detection.train ... --engine detectron2`.

`train(cfg, dist, out, restart)` takes the config detection.train builds and runs it with detectron2's
trainer (SSLDTrainer: its DefaultTrainer with the SSLD optimizer), DetectionCheckpointer and COCOEvaluator.
Rerunning resumes detectron2's way (the last checkpoint's weights, optimizer, scheduler and iteration; the
data order starts afresh); a larger schedule.iterations continues a finished run; --restart discards it.
OUT/detectron2/ is detectron2's own folder (checkpoints, its metrics.json of training events, log.txt,
config.yaml, inference/); OUT/metrics.json (final COCO box AP, the kit's keys), OUT/model_final.pt (what
detection.eval and detection.predict read) and OUT/predictions/ are what the kit's engine writes too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import weakref
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import AMPTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from distill.core.atomic import atomic_write
from distill.core.checkpoint import load_checkpoint, refuse_changed_config, save_checkpoint
from distill.core.distributed import barrier
from distill.core.precision import AMP_DTYPES
from distill.students.artifact import load_student, read_meta
from distill.students.zoo import TIMM_PREFIX

from ..coco_eval import METRICS
from ..data import load_coco, split_paths
from ..predict import predict_images
from .config import check_supported, detectron2_config, register_split
from .inference import Detectron2Detector
from .optimizer import sgd, ssld_param_groups
from .trainer import SSLDTrainer

ENGINE = "detectron2"
FINAL = "model_final.pt"
RUN_CONFIG = "ssld_config.json"   # the kit config the folder's checkpoints were trained with
PREDICTION_SAMPLES = 4
# Keys a resumed run may change. Not optim.lr: detectron2's LRMultiplier restores its base lrs from the checkpoint.
SAFE_ON_RESUME = ("schedule.iterations", "run.log_period", "run.progress", "run.eval_period", "run.checkpoint_period",
                  "run.checkpoint_minutes", "run.workers")


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically and read with torch.load(weights_only=True)."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()},
                **kwargs}
        basename = f"{name}.pth"
        save_checkpoint(Path(self.save_dir) / basename, data)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(Path(self.save_dir) / "last_checkpoint", lambda tmp: Path(tmp).write_text(last_filename_basename))

    def _torch_load(self, f):
        return load_checkpoint(f)


class SkipUnreadable:
    """A DatasetMapper that answers None for an image that does not decode: detectron2's MapDataset then
    draws another (training only; the kit's engine skips and counts such images)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, record):
        try:
            return self.mapper(record)
        except (OSError, ValueError):
            return None


class RunTrainer(SSLDTrainer):
    """SSLDTrainer as the kit runs it: DefaultTrainer's construction with DDP on CPU too (device_ids None),
    bf16 as well as fp16 autocast, atomic checkpoints, the run's log period, the last periodic checkpoint
    kept, and the optimizer's sources kept for the report."""

    def __init__(self, cfg, log_period: int, amp_dtype=None):
        TrainerBase.__init__(self)
        self.cfg, self.log_period = cfg, log_period
        model = build_model(cfg)
        groups, self.optimizer_notes = ssld_param_groups(cfg, model)
        optimizer = sgd(cfg, groups)
        loader = build_detection_train_loader(cfg, mapper=SkipUnreadable(DatasetMapper(cfg, is_train=True)))
        model = create_ddp_model(model, broadcast_buffers=False,
                                 **({} if cfg.MODEL.DEVICE == "cuda" else {"device_ids": None}))
        self._trainer = (AMPTrainer(model, loader, optimizer, precision=amp_dtype) if amp_dtype
                         else SimpleTrainer(model, loader, optimizer))
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter, self.max_iter = 0, cfg.SOLVER.MAX_ITER
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """DefaultTrainer's hooks (PreciseBN aside: FrozenBN) with the run's periods."""
        period = self.cfg.SOLVER.CHECKPOINT_PERIOD or self.max_iter + 1     # 0: only the final checkpoint
        out = [hooks.IterationTimer(), hooks.LRScheduler()]
        if comm.is_main_process():
            out.append(hooks.PeriodicCheckpointer(self.checkpointer, period, max_to_keep=1))

        def evaluate():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        out.append(hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, evaluate))
        if comm.is_main_process():
            out.append(hooks.PeriodicWriter(self.build_writers(), period=self.log_period))
        return out


def student_meta(name: str, pretrained: bool) -> dict:
    """The student's metadata (an artifact's is read without its weights)."""
    return load_student(name, pretrained=pretrained)[1] if str(name).startswith(TIMM_PREFIX) else read_meta(name)


def check_resume(folder: Path, cfg: dict, restart: bool, is_main: bool) -> None:
    """The kit's resume policy over detectron2's folder: --restart discards it; a changed config is refused
    naming the keys, except SAFE_ON_RESUME."""
    if restart:
        if is_main and folder.exists():
            shutil.rmtree(folder)
            print(f"--restart: removed {folder}", file=sys.stderr)
        barrier()
        return
    saved = folder / RUN_CONFIG
    if (folder / "last_checkpoint").is_file() and saved.is_file():
        refuse_changed_config(json.loads(saved.read_text()), cfg, SAFE_ON_RESUME, folder.parent)


@contextlib.contextmanager
def run_logging(folder: Path, is_main: bool):
    """detectron2's log (the logger "detectron2") to FOLDER/log.txt and, on rank 0, to stderr, for this run only
    (detectron2's setup_logger is once per process and keeps the stdout of its first call)."""
    logger = logging.getLogger("detectron2")
    handlers = [logging.FileHandler(folder / "log.txt")] + ([logging.StreamHandler(sys.stderr)] if is_main else [])
    level, propagate = logger.level, logger.propagate
    for handler in handlers:
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)
        logger.propagate = propagate


def coco_metrics(results: dict) -> dict:
    """The kit's METRICS from COCOEvaluator's {"bbox": {...}} (NaN, no ground truth in a size range: 0, as the kit)."""
    box = results.get("bbox", {})
    return {k: 0.0 if math.isnan(box.get(k, math.nan)) else float(box[k]) for k in METRICS}


def train(cfg, dist, out: Path, restart: bool) -> dict:
    """Train and evaluate `cfg` (detection.config's keys, any mapping) with detectron2; the final COCO box
    metrics (detection.coco_eval.METRICS, plus images and corrupt) on every rank."""
    cfg = json.loads(json.dumps(cfg))                     # a plain dict (a Config or a dict)
    out = Path(out)
    folder = out / ENGINE
    notes = check_supported(cfg, dist.device)
    check_resume(folder, cfg, restart, dist.is_main)
    if dist.distributed:   # detectron2's per-machine group, which its launch() would make (torchrun's processes)
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    folder.mkdir(parents=True, exist_ok=True)
    with run_logging(folder, dist.is_main):
        return run(cfg, dist, out, restart, notes)


def run(cfg: dict, dist, out: Path, restart: bool, notes: list[str]) -> dict:
    folder = out / ENGINE
    seed_all_rng(cfg["run"]["seed"] + dist.rank)   # detectron2's own convention (its launch() seeds each rank so)
    # Build: data (checked by the kit's loader, then registered with detectron2), config, trainer.
    train_split = load_coco(*split_paths(cfg["data"], "train"))
    val_split = load_coco(*split_paths(cfg["data"], "val"), category_ids=train_split.category_ids)
    meta = student_meta(cfg["model"]["backbone"], cfg["model"]["pretrained"])
    d2cfg = detectron2_config(cfg, meta, len(train_split.category_ids), register_split(train_split),
                              register_split(val_split), folder, dist.device)
    if dist.is_main:
        atomic_write(folder / RUN_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=1)))
        atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(d2cfg.dump()))
    trainer = RunTrainer(d2cfg, cfg["run"]["log_period"], AMP_DTYPES[cfg["run"]["amp"]])
    trainer.resume_or_load(resume=not restart)
    if dist.is_main:
        m = cfg["model"]
        print(f"{m['arch']} R-CNN through detectron2, backbone {m['backbone']} ({meta['arch']}); "
              f"train: {train_split.summary()}; val: {val_split.summary()}; batch {d2cfg.SOLVER.IMS_PER_BATCH} on "
              f"{dist.world_size} x {dist.device.type}, lr {d2cfg.SOLVER.BASE_LR:g}"
              + (f"; resuming at iteration {trainer.start_iter}" if trainer.start_iter else ""), file=sys.stderr)
        for line in [*trainer.optimizer_notes, *notes]:
            print(f"  {line}", file=sys.stderr)
    trainer.train()
    results = comm.all_gather(getattr(trainer, "_last_eval_results", {}))[0]
    metrics = dict(coco_metrics(results), images=len(val_split), corrupt=0)
    if dist.is_main:
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        save_checkpoint(out / FINAL, dict(engine=ENGINE, model=model.state_dict(), iteration=trainer.max_iter,
                                          config=cfg, detectron2_config=d2cfg.dump(), backbone_meta=meta,
                                          classes=train_split.class_names, category_ids=train_split.category_ids))
        atomic_write(out / "metrics.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(dict(metrics, engine=ENGINE), indent=2)))
        samples = [str(p) for p in val_split.paths[:PREDICTION_SAMPLES]]
        predict_images(Detectron2Detector(model, d2cfg), samples, out / "predictions", train_split.class_names,
                       dist.device)
        print(f"done: AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}; {out / FINAL}, {folder}/", file=sys.stderr)
    barrier()
    return metrics
