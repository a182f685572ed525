"""Box heads shared by Faster and Cascade R-CNN: the predictor, the L1 box loss, and Faster's RoI heads."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads


class BoxPredictor(nn.Module):
    """Class logits (background = 0) and box deltas, per class or class-agnostic (4 outputs)."""

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic else 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def box_head_losses(class_logits, box_deltas, labels, regression_targets):
    """Cross-entropy + L1 on foreground deltas, normalised by the number of sampled boxes (detectron2)."""
    cls_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    if box_deltas.shape[1] == 4:            # class-agnostic
        deltas = box_deltas[pos]
    else:
        deltas = box_deltas.reshape(len(box_deltas), -1, 4)[pos, labels[pos]]
    box_loss = F.l1_loss(deltas, regression_targets[pos], reduction="sum") / max(labels.numel(), 1)
    return cls_loss, box_loss


class FastRCNNHeads(RoIHeads):
    """torchvision's box RoIHeads (sampling, postprocessing) with the L1 loss; boxes only."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_deltas = self.box_predictor(x)
        class_logits, box_deltas = class_logits.float(), box_deltas.float()   # boxes in float32 under AMP
        if self.training:
            cls_loss, box_loss = box_head_losses(class_logits, box_deltas, torch.cat(labels),
                                                 torch.cat(regression_targets))
            return [], {"loss_classifier": cls_loss, "loss_box_reg": box_loss}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_deltas, proposals, image_shapes)
        return [dict(boxes=b, scores=s, labels=c) for b, s, c in zip(boxes, scores, labels)], {}
