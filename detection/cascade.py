"""Cascade R-CNN box heads (Cai & Vasconcelos 2018), with detectron2's CascadeROIHeads semantics.

Three stages, each with its own box head, IoU threshold (0.5/0.6/0.7) and box-coder weights
((10,10,5,5), (20,20,10,10), (30,30,15,15)); regression is class-agnostic. Stage 0 adds the ground truth
to the RPN proposals and samples 512 per image (25% foreground); each later stage takes the previous
stage's boxes (detached, clipped, empty ones dropped in training) and labels them with its own threshold.
The gradient into the pooled features is scaled by 1/num_stages per stage. At test the class scores are
averaged over the stages and the boxes are the last stage's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import box_iou, boxes as box_ops

from .box_heads import box_head_losses

DEFAULT_IOUS = (0.5, 0.6, 0.7)
DEFAULT_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient times `scale` backward."""
    return _ScaleGradient.apply(x, scale)


class CascadeRoIHeads(nn.Module):
    def __init__(self, box_roi_pool: nn.Module, box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module],
                 ious: Sequence[float] = DEFAULT_IOUS, weights: Sequence[Sequence[float]] = DEFAULT_WEIGHTS,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100):
        super().__init__()
        if not len(box_heads) == len(box_predictors) == len(ious) == len(weights):
            raise ValueError("one box head, predictor, IoU threshold and coder weight set per stage")
        self.box_roi_pool = box_roi_pool
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in ious]
        self.box_coders = [BoxCoder(tuple(float(v) for v in w)) for w in weights]
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def label_boxes(self, stage: int, proposals: list[torch.Tensor], targets: list[dict]):
        """Per image: class label per proposal (0 = background, below this stage's IoU threshold) and the
        matched ground-truth box."""
        labels, matched = [], []
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"].to(boxes.dtype), target["labels"]
            if gt_boxes.numel() == 0:
                labels.append(torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device))
                matched.append(torch.zeros_like(boxes))
                continue
            idx = self.matchers[stage](box_iou(gt_boxes, boxes))
            lab = gt_labels[idx.clamp(min=0)].to(torch.int64)
            lab[idx < 0] = 0
            labels.append(lab)
            matched.append(gt_boxes[idx.clamp(min=0)])
        return labels, matched

    def regression_targets(self, stage: int, matched: list[torch.Tensor], proposals: list[torch.Tensor]):
        return self.box_coders[stage].encode(matched, proposals)

    def sample(self, proposals, targets):
        """Stage 0 training input: proposals + ground truth, subsampled to batch_size_per_image."""
        proposals = [torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]
        labels, _ = self.label_boxes(0, proposals, targets)
        pos, neg = self.sampler(labels)
        return [p[torch.where(a | b)[0]] for p, a, b in zip(proposals, pos, neg)]

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals = self.sample(proposals, targets)
        losses, stage_scores, boxes = {}, [], proposals
        for k in range(self.num_stages):
            if k > 0:
                proposals = [box_ops.clip_boxes_to_image(b.detach(), s) for b, s in zip(boxes, image_shapes)]
                if self.training:  # detectron2 drops empty boxes before relabelling
                    proposals = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in proposals]
            x = self.box_roi_pool(features, proposals, image_shapes)
            x = self.box_heads[k](scale_gradient(x, 1.0 / self.num_stages))
            class_logits, deltas = self.box_predictors[k](x)
            class_logits, deltas = class_logits.float(), deltas.float()   # boxes in float32 under AMP
            if self.training:
                labels, matched = self.label_boxes(k, proposals, targets)
                reg = self.regression_targets(k, matched, proposals)
                cls_loss, box_loss = box_head_losses(class_logits, deltas, torch.cat(labels), torch.cat(reg))
                losses[f"loss_classifier_s{k}"], losses[f"loss_box_reg_s{k}"] = cls_loss, box_loss
            else:
                stage_scores.append(F.softmax(class_logits, -1))
            if k + 1 < self.num_stages or not self.training:
                boxes = self.box_coders[k].decode(deltas, proposals).reshape(-1, 4)
                boxes = boxes.split([len(p) for p in proposals])
        if self.training:
            return [], losses
        scores = (sum(stage_scores) / self.num_stages).split([len(p) for p in proposals])
        return [self.postprocess(b, s, shape) for b, s, shape in zip(boxes, scores, image_shapes)], {}

    def postprocess(self, boxes, scores, image_shape) -> dict:
        """Class-agnostic boxes x per-class scores -> score threshold, per-class NMS, top detections."""
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        num_classes = scores.shape[1] - 1
        scores = scores[:, 1:].reshape(-1)
        labels = torch.arange(1, num_classes + 1, device=scores.device).repeat(len(boxes))
        boxes = boxes.repeat_interleave(num_classes, dim=0)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return dict(boxes=boxes[keep], scores=scores[keep], labels=labels[keep])
