"""Classification metrics, reduced across DDP ranks: top-1, top-5 and mean per-class accuracy (in percent)."""
from __future__ import annotations

import torch
import torch.nn as nn

from distill.core.distributed import all_reduce_sum
from distill.core.precision import autocast


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the k highest logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def confusion_counts(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows the true class, columns the predicted one (float64, on CPU)."""
    cells = targets.cpu() * num_classes + logits.argmax(1).cpu()
    return torch.bincount(cells, minlength=num_classes ** 2).reshape(num_classes, num_classes).double()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device, num_classes: int, amp_dtype=None,
                        channels_last: bool = False, confusion: bool = False) -> dict:
    """top1/top5/mean_per_class in percent over the whole (possibly sharded) loader, and n; with `confusion`
    also the confusion matrix (rows: true class, columns: predicted; a float64 tensor).

    Mean per-class accuracy averages over classes present in the data (Kornblith et al. protocol).
    Under DDP each rank evaluates its shard; counts are summed, so the result equals a single-process run
    when the sampler covers every sample exactly once.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    counts = torch.zeros(3, dtype=torch.float64)  # n, top1, top5
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for batch in loader:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:   # the layout the model was trained in
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device.type, amp_dtype):
            logits = model(images).float()
        c1, c5 = topk_correct(logits, targets, (1, 5))
        counts += torch.tensor([len(targets), c1, c5], dtype=torch.float64)
        matrix += confusion_counts(logits, targets, num_classes)
    model.train(was_training)
    totals = all_reduce_sum(torch.cat([counts, matrix.flatten()]).to(device)).cpu()
    n, c1, c5 = totals[:3].tolist()
    matrix = totals[3:].reshape(num_classes, num_classes)
    hits, seen = matrix.diag(), matrix.sum(1)
    present = seen > 0
    mean_pc = float((hits[present] / seen[present]).mean() * 100) if present.any() else 0.0
    n = max(n, 1.0)
    out = dict(top1=100 * c1 / n, top5=100 * c5 / n, mean_per_class=mean_pc, n=int(n))
    return dict(out, confusion=matrix) if confusion else out
