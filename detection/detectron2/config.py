"""The kit's detection config (detection.config's keys) as a detectron2 CfgNode: the same recipe, key by key.

Starts from detectron2's own Base-RCNN-FPN.yaml (shipped in its package) and sets what the kit's recipe
says. Kept as detectron2 does it, and stated in docs/benchmarks.md: its data pipeline (ResizeShortestEdge
on uint8 images, aspect-ratio grouping, flip probability 0.5), its weight init, its test loader (batch 1).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from distill.core.errors import UserError
from distill.core.schedule import scale_lr

from distill.students.decay import weight_decay_for

from ..backbone import DEFAULT_WEIGHT_DECAY
from .backbone import NAMES, add_ssld_config

RPN_POST_NMS_TRAIN = {"faster": 1000, "cascade": 2000}   # detectron2 Base-RCNN-FPN / Cascade configs
HEADS = {"faster": "StandardROIHeads", "cascade": "CascadeROIHeads"}


def base_rcnn_fpn() -> CfgNode:
    """detectron2's defaults merged with its Base-RCNN-FPN.yaml (read from the package: detectron2.model_zoo
    itself needs pkg_resources), with the MODEL.SSLD node."""
    import detectron2

    cfg = get_cfg()
    cfg.merge_from_file(str(Path(detectron2.__file__).parent / "model_zoo" / "configs" / "Base-RCNN-FPN.yaml"))
    return add_ssld_config(cfg)


def register_split(split) -> str:
    """Register a checked COCO split (detection.data.CocoSplit) with detectron2's catalogs under a name
    derived from its files, once per process; returns the name."""
    where = f"{split.json_path.resolve()}|{split.image_root.resolve()}"
    name = f"ssld_{split.json_path.stem}_{hashlib.sha1(where.encode()).hexdigest()[:10]}"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(split.json_path), str(split.image_root))
    return name


def check_supported(cfg, device: torch.device) -> list[str]:
    """One-line errors for kit settings detectron2 cannot run; notes for those it ignores (run.checkpoint_minutes
    and data.eval_batch_size too, silently: its checkpoints are periodic only, its test loader takes 1 image)."""
    run, data = cfg["run"], cfg["data"]
    if data["hflip"] not in (0, 0.5):
        raise UserError(f"data.hflip={data['hflip']}: the detectron2 engine flips with probability 0.5 or 0 "
                        "(detectron2's RandomFlip as INPUT.RANDOM_FLIP sets it)")
    if run["amp"] != "off" and device.type != "cuda":
        raise UserError(f"run.amp={run['amp']} on {device.type}: detectron2's AMPTrainer needs CUDA; "
                        "use run.amp=off, or --engine kit")
    if cfg["optim"].get("clip_grad_norm"):
        raise UserError(f"optim.clip_grad_norm={cfg['optim']['clip_grad_norm']}: detectron2's SOLVER.CLIP_GRADIENTS "
                        "clips each parameter, not the global norm; set it to 0, or use --engine kit")
    return ["run.compile ignored: the detectron2 engine runs eagerly"] if run.get("compile") else []


def detectron2_config(cfg, meta: dict, num_classes: int, train_name: str, val_name: str, out_dir,
                      device: torch.device) -> CfgNode:
    """A frozen detectron2 CfgNode for the kit config `cfg` (a mapping with detection.config's keys) and the
    student's metadata `meta`; `train_name` / `val_name` are registered datasets (register_split)."""
    m, data, o, s, run = cfg["model"], cfg["data"], cfg["optim"], cfg["schedule"], cfg["run"]
    d2 = base_rcnn_fpn()
    d2.MODEL.DEVICE = device.type
    d2.MODEL.BACKBONE.NAME = "build_ssld_fpn_backbone"
    d2.MODEL.SSLD.STUDENT = str(m["backbone"])
    d2.MODEL.SSLD.PRETRAINED = bool(m["pretrained"])
    d2.MODEL.SSLD.MULTIPLIERS = list(m["multipliers"] or [])
    d2.MODEL.SSLD.FROZEN_BN = m["frozen_bn"]
    d2.MODEL.SSLD.CHANNELS_LAST = bool(run["channels_last"])
    d2.MODEL.SSLD.WEIGHT_DECAY = o["weight_decay"]
    # The student's own preprocessing: RGB, its mean and std (0-255 scale), so the backbone's input is as trained.
    d2.INPUT.FORMAT = "RGB"
    d2.MODEL.PIXEL_MEAN = [255.0 * v for v in meta["preprocessing"]["mean"]]
    d2.MODEL.PIXEL_STD = [255.0 * v for v in meta["preprocessing"]["std"]]
    d2.MODEL.FPN.IN_FEATURES = list(NAMES)
    d2.MODEL.FPN.OUT_CHANNELS = m["fpn_channels"]
    d2.MODEL.ANCHOR_GENERATOR.SIZES = [[size] for size in m["anchor_sizes"]]
    d2.MODEL.RPN.BATCH_SIZE_PER_IMAGE = m["rpn_batch_per_image"]
    d2.MODEL.RPN.PRE_NMS_TOPK_TRAIN = m["rpn_pre_nms_train"]
    d2.MODEL.RPN.PRE_NMS_TOPK_TEST = m["rpn_pre_nms_test"]
    d2.MODEL.RPN.POST_NMS_TOPK_TRAIN = m["rpn_post_nms_train"] or RPN_POST_NMS_TRAIN[m["arch"]]
    d2.MODEL.RPN.POST_NMS_TOPK_TEST = m["rpn_post_nms_test"]
    d2.MODEL.ROI_HEADS.NAME = HEADS[m["arch"]]
    d2.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = m["roi_batch_per_image"]
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = m["score_thresh"]
    d2.MODEL.ROI_HEADS.NMS_THRESH_TEST = m["nms_thresh"]
    d2.MODEL.ROI_BOX_HEAD.FC_DIM = m["box_head_dim"]
    if m["arch"] == "cascade":
        d2.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
        d2.MODEL.ROI_BOX_CASCADE_HEAD.IOUS = list(m["cascade_ious"])
        d2.MODEL.ROI_HEADS.IOU_THRESHOLDS = [m["cascade_ious"][0]]   # detectron2 asserts the first stage's match
        d2.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS = [list(w) for w in m["cascade_weights"]]
    d2.TEST.DETECTIONS_PER_IMAGE = m["detections_per_image"]
    d2.INPUT.MIN_SIZE_TRAIN = list(m["train_sizes"])
    d2.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    d2.INPUT.MAX_SIZE_TRAIN = m["max_size"]
    d2.INPUT.MIN_SIZE_TEST = m["test_size"]
    d2.INPUT.MAX_SIZE_TEST = m["max_size"]
    d2.INPUT.RANDOM_FLIP = "horizontal" if data["hflip"] else "none"
    d2.DATASETS.TRAIN = [train_name]
    d2.DATASETS.TEST = [val_name]
    d2.DATALOADER.NUM_WORKERS = run["workers"]
    d2.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False     # the kit trains on background-only images too
    d2.SOLVER.IMS_PER_BATCH = data["batch_size"]
    d2.SOLVER.BASE_LR = scale_lr(o["lr"], data["batch_size"], o["base_batch"])
    d2.SOLVER.MOMENTUM = o["momentum"]
    # The kit's detector decays every parameter by one value (given, or the student's matched L2): the same
    # here, so both engines run one recipe; the backbone's groups take MODEL.SSLD.WEIGHT_DECAY's rule.
    d2.SOLVER.WEIGHT_DECAY = weight_decay_for(o["weight_decay"], meta, DEFAULT_WEIGHT_DECAY,
                                              "-o optim.weight_decay=VALUE")[0]
    d2.SOLVER.MAX_ITER = s["iterations"]
    # A step at or past the last iteration never applies (the kit accepts one; fvcore refuses it).
    d2.SOLVER.STEPS = [step for step in s["steps"] if step < s["iterations"]]
    d2.SOLVER.GAMMA = s["gamma"]
    d2.SOLVER.WARMUP_ITERS = s["warmup_iters"]
    d2.SOLVER.WARMUP_FACTOR = s["warmup_factor"]
    d2.SOLVER.CHECKPOINT_PERIOD = run["checkpoint_period"]
    d2.SOLVER.AMP.ENABLED = run["amp"] != "off"
    d2.TEST.EVAL_PERIOD = run["eval_period"]
    d2.SEED = run["seed"]
    d2.OUTPUT_DIR = str(out_dir)
    d2.freeze()
    return d2
