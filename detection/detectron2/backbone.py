"""Any student the kit resolves as a detectron2 Backbone: res2..res5 from its feature maps, under detectron2's FPN.

The bottom-up part is the kit detector's trunk (`detection.backbone.student_body`): the student's timm model
behind timm's feature getter at strides 4-32, FrozenBN folded into the convolutions when it has trained
weights (trainable BN at random init), the per-stage multiplier rules of distill.students.stages, a 0
freezing its stage (MODEL.SSLD.MULTIPLIERS replaces MODEL.BACKBONE.FREEZE_AT). `build_ssld_fpn_backbone` puts
detectron2's own FPN with LastLevelMaxPool (P6) on top, as `build_resnet_fpn_backbone` does.
"""
from __future__ import annotations

import json

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from distill.core.errors import UserError
from distill.students import zoo
from distill.students.artifact import load_student
from distill.students.stages import parse_multipliers

from ..backbone import STRIDES, default_multipliers, has_trained_weights, student_body

NAMES = ("res2", "res3", "res4", "res5")   # detectron2's names for the stride 4, 8, 16, 32 features


def add_ssld_config(cfg: CfgNode) -> CfgNode:
    """Add the MODEL.SSLD node (idempotent); returns cfg."""
    if "SSLD" in cfg.MODEL:
        return cfg
    cfg.MODEL.SSLD = CfgNode()
    cfg.MODEL.SSLD.STUDENT = ""             # artifact path or name, zoo name, timm:ARCH, local-dir:FOLDER
    cfg.MODEL.SSLD.PRETRAINED = False       # timm:ARCH only: timm's ImageNet weights (needs network)
    cfg.MODEL.SSLD.MULTIPLIERS = []         # 5 per-stage lr multipliers (0 freezes); []: recommended.detection
    cfg.MODEL.SSLD.WEIGHT_DECAY = None      # the backbone's L2; None: matched to the student's pretraining, else 1e-4
    cfg.MODEL.SSLD.FROZEN_BN = None         # None: FrozenBN when the student has trained weights
    cfg.MODEL.SSLD.CHANNELS_LAST = False    # run the trunk NHWC
    cfg.MODEL.SSLD.OUT_FEATURES = list(NAMES)
    cfg.MODEL.SSLD.STUDENT_META = ""        # the student's metadata (JSON): build at random init, weights from
                                            # a checkpoint (what saved runs set, so they load without the student)
    return cfg


def input_affine(meta: dict, pixel_mean, pixel_std, input_format: str):
    """(channel order, scale, shift) taking detectron2's normalised input ((image - PIXEL_MEAN) / PIXEL_STD on
    0-255 pixels in INPUT.FORMAT order) to the student's own preprocessing (RGB in [0, 1], its mean and std);
    None when they already agree (set PIXEL_MEAN / PIXEL_STD to 255 x the student's and INPUT.FORMAT RGB)."""
    order = [2, 1, 0] if input_format == "BGR" else [0, 1, 2]
    mean_in = torch.tensor(pixel_mean, dtype=torch.float64)[order]
    std_in = torch.tensor(pixel_std, dtype=torch.float64)[order]
    mean, std = (torch.tensor(meta["preprocessing"][k], dtype=torch.float64) for k in ("mean", "std"))
    scale = std_in / (255 * std)
    shift = (mean_in / 255 - mean) / std
    if order == [0, 1, 2] and torch.allclose(scale, torch.ones_like(scale), atol=1e-6) and \
            torch.allclose(shift, torch.zeros_like(shift), atol=1e-6):
        return None
    return order, scale.float(), shift.float()


class SSLDBackbone(Backbone):
    """A student's trunk as detectron2's bottom-up backbone: {res2..res5: features}, output_shape() from
    timm's feature_info. `meta` is the student's metadata; `param_rules` and `multipliers_source` feed
    build_ssld_optimizer."""

    def __init__(self, trunk: torch.nn.Module, meta: dict, multipliers=None, frozen_bn=None,
                 out_features=NAMES, channels_last: bool = False, affine=None):
        super().__init__()
        family = (meta.get("stages") or {}).get("family", "generic")
        if multipliers:
            self.multipliers, self.multipliers_source = parse_multipliers(multipliers, family), "MODEL.SSLD.MULTIPLIERS"
        else:
            self.multipliers = default_multipliers(meta)
            self.multipliers_source = ("the student's recommended.detection"
                                       if (meta.get("recommended") or {}).get("detection") else "1.0: plain model")
        self.frozen_bn = has_trained_weights(meta) if frozen_bn is None else bool(frozen_bn)
        self.body, self.param_rules, _ = student_body(trunk, family, self.multipliers, self.frozen_bn)
        self.meta, self.family = meta, family
        unknown = [f for f in out_features if f not in NAMES]
        if unknown:
            raise UserError(f"MODEL.SSLD.OUT_FEATURES {list(out_features)}: {unknown} unknown; "
                            f"choose from {list(NAMES)}")
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(NAMES, self.body.feature_info.channels()))
        self._out_feature_strides = dict(zip(NAMES, STRIDES))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.body.to(memory_format=torch.channels_last)
        self.order = None
        if affine is not None:
            self.order = affine[0]
            self.register_buffer("input_scale", affine[1].view(1, 3, 1, 1), persistent=False)
            self.register_buffer("input_shift", affine[2].view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        if self.order is not None:
            x = x[:, self.order] * self.input_scale + self.input_shift
        features = self.body(x.contiguous(memory_format=self.memory_format))
        return {name: f for name, f in zip(NAMES, features) if name in self._out_features}


def student_trunk(ssld: CfgNode) -> tuple[torch.nn.Module, dict]:
    """The student's timm model with its weights, or only its architecture when STUDENT_META is set."""
    if ssld.STUDENT_META:
        meta = json.loads(ssld.STUDENT_META)
        return zoo.create_model(meta["arch"], num_classes=meta["num_classes"]), meta
    if not ssld.STUDENT:
        raise UserError("cfg.MODEL.SSLD.STUDENT is empty: name a student (r50_vd_ssld, a .safetensors path, "
                        "timm:ARCH or local-dir:FOLDER)")
    return load_student(ssld.STUDENT, pretrained=ssld.PRETRAINED)


@BACKBONE_REGISTRY.register()
def build_ssld_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> SSLDBackbone:
    """MODEL.BACKBONE.NAME "build_ssld_backbone": the student's res2..res5 (MODEL.SSLD.OUT_FEATURES) alone."""
    if "SSLD" not in cfg.MODEL:
        raise UserError("cfg has no MODEL.SSLD node: call detection.detectron2.add_ssld_config(cfg) first")
    s = cfg.MODEL.SSLD
    trunk, meta = student_trunk(s)
    affine = input_affine(meta, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT)
    return SSLDBackbone(trunk, meta, multipliers=list(s.MULTIPLIERS), frozen_bn=s.FROZEN_BN,
                        out_features=s.OUT_FEATURES, channels_last=s.CHANNELS_LAST, affine=affine)


@BACKBONE_REGISTRY.register()
def build_ssld_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """MODEL.BACKBONE.NAME "build_ssld_fpn_backbone": the student under detectron2's FPN (P2-P6)."""
    bottom_up = build_ssld_backbone(cfg, input_shape)
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES or list(bottom_up._out_features),
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(),
               fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
