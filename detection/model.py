"""Faster R-CNN and Cascade R-CNN (FPN) on torchvision parts, with detectron2's choices where they differ.

torchvision supplies the resize/normalise transform, anchors, RPN, matcher, sampler, box coder and NMS.
What differs from torchvision's FasterRCNN (detectron2's choices):
- RoIAlign with aligned=True and adaptive sampling (detectron2 ROIAlignV2),
- L1 box-regression losses in the RPN and the box heads (detectron2 SMOOTH_L1_BETA 0),
- predictor init N(0, 0.01) / N(0, 0.001) (detectron2 FastRCNNOutputLayers),
- 1000 post-NMS proposals per training image for Faster, 2000 for Cascade.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.poolers import LevelMapper

from distill.students import zoo

from .backbone import LEVELS, STRIDES, build_backbone
from .box_heads import BoxPredictor, FastRCNNHeads
from .cascade import CascadeRoIHeads
from .roi_align import multilevel_roi_align

ARCHS = ("faster", "cascade")
RPN_POST_NMS_TRAIN = {"faster": 1000, "cascade": 2000}  # detectron2 Base-RCNN-FPN / Cascade configs


class AlignedMultiScaleRoIAlign(nn.Module):
    """torchvision's MultiScaleRoIAlign with aligned=True (pixel centres shifted by -0.5: detectron2
    ROIAlignV2) and sampling_ratio 0 (adaptive), on the CPU as a sparse matrix (detection.roi_align).
    Levels by FPN eq. 1: k = floor(4 + log2(sqrt(wh)/224))."""

    def __init__(self, featmap_names=LEVELS, strides=STRIDES, output_size: int = 7):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.scales = [1.0 / s for s in strides]
        levels = [int(torch.tensor(float(s)).log2()) for s in strides]
        self.map_levels = LevelMapper(levels[0], levels[-1])
        self.output_size = output_size
        self.sparse = True               # False: torchvision's RoIAlign kernels on the CPU as well

    def forward(self, features: dict, boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        return multilevel_roi_align([features[k] for k in self.featmap_names], rois, self.map_levels(boxes),
                                    self.scales, self.output_size, sparse=self.sparse)


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with an L1 box loss (detectron2 RPN SMOOTH_L1_BETA 0; torchvision: beta 1/9)."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg))[0]])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], regression_targets[pos], reduction="sum") / max(sampled.numel(), 1)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's resize + normalise + pad-to-32; in training the shorter side is drawn per image
    from `train_sizes` (multi-scale when several), at test it is `test_size`."""

    def __init__(self, train_sizes, test_size: int, max_size: int, mean, std):
        super().__init__(min_size=test_size, max_size=max_size, image_mean=list(mean), image_std=list(std))
        self.train_sizes = tuple(int(s) for s in train_sizes)

    def torch_choice(self, k):
        return self.train_sizes[int(torch.randint(len(self.train_sizes), ()).item())]


def build_detector(cfg: dict, num_classes: int, trunk: nn.Module, meta: dict, *,
                   channels_last: bool = True) -> GeneralizedRCNN:
    """A detector from the `model` section of a detection config and a student trunk with its metadata;
    `channels_last` is run.channels_last (inference always uses it)."""
    backbone = build_backbone(trunk, meta, multipliers=cfg["multipliers"], frozen_bn=cfg["frozen_bn"],
                              out_channels=cfg["fpn_channels"], channels_last=channels_last)
    channels, dim = backbone.out_channels, cfg["box_head_dim"]
    prep = meta["preprocessing"]
    transform = DetectionTransform(cfg["train_sizes"], cfg["test_size"], cfg["max_size"], prep["mean"], prep["std"])
    anchors = AnchorGenerator(sizes=tuple((s,) for s in cfg["anchor_sizes"]),
                              aspect_ratios=((0.5, 1.0, 2.0),) * len(cfg["anchor_sizes"]))
    post_train = cfg["rpn_post_nms_train"] or RPN_POST_NMS_TRAIN[cfg["arch"]]
    rpn = L1RegionProposalNetwork(
        anchors, RPNHead(channels, 3), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=cfg["rpn_batch_per_image"], positive_fraction=0.5,
        pre_nms_top_n=dict(training=cfg["rpn_pre_nms_train"], testing=cfg["rpn_pre_nms_test"]),
        post_nms_top_n=dict(training=post_train, testing=cfg["rpn_post_nms_test"]), nms_thresh=0.7)
    pool = AlignedMultiScaleRoIAlign(LEVELS, STRIDES, output_size=7)
    common = dict(score_thresh=cfg["score_thresh"], nms_thresh=cfg["nms_thresh"],
                  detections_per_img=cfg["detections_per_image"])
    if cfg["arch"] == "faster":
        heads = FastRCNNHeads(pool, TwoMLPHead(channels * 49, dim), BoxPredictor(dim, num_classes),
                              fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=cfg["roi_batch_per_image"],
                              positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), **common)
    else:
        stages = len(cfg["cascade_ious"])
        heads = CascadeRoIHeads(
            pool, [TwoMLPHead(channels * 49, dim) for _ in range(stages)],
            [BoxPredictor(dim, num_classes, class_agnostic=True) for _ in range(stages)],
            ious=cfg["cascade_ious"], weights=cfg["cascade_weights"],
            batch_size_per_image=cfg["roi_batch_per_image"], positive_fraction=0.25, **common)
    model = GeneralizedRCNN(backbone, rpn, heads, transform)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def trunk_from_meta(meta: dict) -> nn.Module:
    """The student's architecture at random init: weights come from a detection checkpoint."""
    return zoo.create_model(meta["arch"], num_classes=meta["num_classes"])


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: trunk parameters with their stage multiplier and decay rule (distill.students.stages),
    FPN, RPN and box heads at lr x1 with full decay."""
    core = model.module if hasattr(model, "module") else model
    rules, prefix = core.backbone.param_rules, "backbone.body.model."
    groups: dict[tuple, dict] = {}
    for name, p in core.named_parameters():
        if not p.requires_grad:
            continue
        mult, decay, label = rules[name[len(prefix):]] if name.startswith(prefix) else (1.0, 1.0, "heads")
        key = (label, mult, decay)
        if key not in groups:
            groups[key] = dict(params=[], name=label, lr=lr * mult, lr_mult=mult, weight_decay=weight_decay * decay)
        groups[key]["params"].append(p)
    return list(groups.values())


def load_detector(path, device="cpu") -> tuple[GeneralizedRCNN, dict]:
    """Rebuild a detector from a detection checkpoint alone (config, backbone metadata, classes, weights)."""
    from distill.core.checkpoint import load_checkpoint
    from distill.core.errors import UserError

    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and ckpt.get("engine") == "detectron2":   # written by detection.detectron2.train
        from .detectron2.inference import load_detector as load_detectron2_detector
        return load_detectron2_detector(ckpt, device), ckpt
    if not isinstance(ckpt, dict) or \
            not all(k in ckpt for k in ("model", "model_config", "backbone_meta", "classes", "category_ids")):
        raise UserError(f"{path} is not a detection checkpoint (written by python -m detection.train)")
    model = build_detector(ckpt["model_config"], len(ckpt["classes"]), trunk_from_meta(ckpt["backbone_meta"]),
                           ckpt["backbone_meta"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
