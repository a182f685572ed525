"""Label cross-entropy, the one supervised loss every classification trainer shares (distill.ssld's hard
term and its labels-only mode, transfer.finetune): unlabeled images (label -1) are ignored, mixup-aware."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -1  # the label of an unlabeled image


def hard_ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, mix=None,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the labeled images only (label -1 = unlabeled), mixup-aware.

    `mix` = (lam, labels_rolled) when the batch was mixed with itself rolled by one: the target is then
    lam * y + (1 - lam) * y_rolled, each part over the images that carry that label.
    """
    logits = student_logits.float()
    if mix is None:
        return _masked_ce(logits, labels, label_smoothing)
    lam, rolled = mix
    return lam * _masked_ce(logits, labels, label_smoothing) + (1 - lam) * _masked_ce(logits, rolled, label_smoothing)


def _masked_ce(logits, labels, label_smoothing):
    labeled = labels != IGNORE
    if not bool(labeled.any()):
        return logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alive
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum", label_smoothing=label_smoothing)
    return ce / labeled.sum()
