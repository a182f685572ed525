"""The detection config schema: every key a YAML recipe (configs/detection/*.yaml) or `-o key=value` may set.

Values here are detectron2's COCO defaults at the SSLD paper's 640 px; recipes state what differs.
"""
from __future__ import annotations

from distill.core.config import Config, ConfigError, load_config
from distill.core.trainer_kit import RUN_DEFAULTS, check_choice, check_run, check_sections
from distill.students.stages import parse_multipliers

from .model import ARCHS

DEFAULTS = {
    # channels_last: the detector's convolutions run NHWC in training and at test (oneDNN and cuDNN's layout;
    # with the sparse RoIAlign it also spares two copies of every pooled map: docs/benchmarks.md)
    "run": dict(RUN_DEFAULTS, out_dir="runs/detection", log_period=20, checkpoint_period=5000, channels_last=True),
    "model": {
        "arch": "faster",                 # faster | cascade
        "backbone": "r50_vd_ssld",        # student artifact (name or path), or timm:ARCH
        "pretrained": False,              # timm:ARCH only: start from timm's ImageNet weights (needs network)
        "frozen_bn": None,                # null: FrozenBN when the trunk has trained weights, else trainable BN
        "multipliers": None,              # 5 per-stage lr multipliers; null: the artifact's recommended.detection
        "fpn_channels": 256,
        "box_head_dim": 1024,
        "train_sizes": [640],             # shorter side; one drawn per image (multi-scale when several)
        "test_size": 640,
        "max_size": 1066,                 # longer side cap (1333 x 640/800)
        "anchor_sizes": [32, 64, 128, 256, 512],
        "rpn_batch_per_image": 256,
        "rpn_pre_nms_train": 2000,        # per FPN level
        "rpn_pre_nms_test": 1000,
        "rpn_post_nms_train": None,       # per image; null: 1000 (faster) / 2000 (cascade)
        "rpn_post_nms_test": 1000,
        "roi_batch_per_image": 512,
        "cascade_ious": [0.5, 0.6, 0.7],
        "cascade_weights": [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]],
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_image": 100,
    },
    "data": {
        "coco_root": None,                # folder with train2017/, val2017/, annotations/instances_*2017.json
        "train_json": None,               # any COCO-format dataset: json + image folder (file_name relative to it)
        "train_images": None,
        "val_json": None,
        "val_images": None,
        "hflip": 0.5,
        "batch_size": 16,                 # global: split evenly over the torchrun processes
        "eval_batch_size": 2,             # global likewise (at least one image per process)
    },
    "optim": {
        "lr": 0.02,                       # at base_batch, scaled linearly to data.batch_size
        "base_batch": 16,
        "momentum": 0.9,
        "weight_decay": None,             # null: matched to the artifact's pretraining L2, else 1e-4
        "clip_grad_norm": 0.0,            # 0 = off; else the global gradient norm
    },
    "schedule": {
        "iterations": 90000,              # 1x; 3x is 270000
        "steps": [60000, 80000],
        "gamma": 0.1,
        "warmup_iters": 1000,
        "warmup_factor": 0.001,
    },
}
RANGES = {
    "data": {"hflip": (0.0, 1.0), "batch_size": (1, None), "eval_batch_size": (1, None)},
    "optim": {"lr": (0.0, None), "base_batch": (1, None), "momentum": (0.0, 1.0), "weight_decay": (0.0, None),
              "clip_grad_norm": (0.0, None)},
    "schedule": {"iterations": (1, None), "steps": (0, None), "gamma": (0.0, None), "warmup_iters": (0, None),
                 "warmup_factor": (0.0, 1.0)},
    "model": {"fpn_channels": (1, None), "box_head_dim": (1, None), "test_size": (32, None), "max_size": (32, None),
              "rpn_batch_per_image": (1, None), "roi_batch_per_image": (1, None), "score_thresh": (0.0, 1.0),
              "nms_thresh": (0.0, 1.0), "detections_per_image": (1, None)},
}


def load_detection_config(path=None, overrides=(), flags=None) -> Config:
    """load then check: defaults <- YAML recipe <- overrides <- flags."""
    return check(load_config(path, overrides, defaults=DEFAULTS, flags=flags))


def check(cfg: Config) -> Config:
    m, s = cfg.model, cfg.schedule
    check_run(cfg)
    check_sections(cfg, RANGES)
    check_choice(m.arch, "model.arch", ARCHS)
    if m.multipliers is not None:
        m.multipliers = parse_multipliers(m.multipliers)
    if not m.train_sizes or any(not isinstance(s, int) or s < 32 for s in m.train_sizes):
        raise ConfigError(f"model.train_sizes={m.train_sizes!r}; expected a list of sizes >= 32 px")
    if len(m.cascade_ious) != len(m.cascade_weights) or any(len(w) != 4 for w in m.cascade_weights):
        raise ConfigError("model.cascade_weights needs one [wx, wy, ww, wh] per entry of model.cascade_ious")
    if sorted(s.steps) != list(s.steps):
        raise ConfigError(f"schedule.steps={s.steps} must be increasing iteration numbers")
    return cfg
