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


def per_class_counts(logits: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """(correct per class, samples per class) as float tensors of length num_classes."""
    correct = (logits.argmax(1) == targets).float()
    hits = torch.zeros(num_classes).index_add_(0, targets.cpu(), correct.cpu())
    seen = torch.zeros(num_classes).index_add_(0, targets.cpu(), torch.ones_like(correct).cpu())
    return hits, seen


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device, num_classes: int, amp_dtype=None,
                        channels_last: bool = False) -> dict:
    """top1/top5/mean_per_class in percent over the whole (possibly sharded) loader, and n.

    Mean per-class accuracy averages over classes present in the data (Kornblith et al. protocol).
    Under DDP each rank evaluates its shard; counts are summed, so the result equals a single-process run
    when the sampler covers every sample exactly once.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    counts = torch.zeros(3, dtype=torch.float64)  # n, top1, top5
    hits = torch.zeros(num_classes, dtype=torch.float64)
    seen = torch.zeros(num_classes, dtype=torch.float64)
    for batch in loader:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:   # the layout the model was trained in
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device.type, amp_dtype):
            logits = model(images).float()
        c1, c5 = topk_correct(logits, targets, (1, 5))
        counts += torch.tensor([len(targets), c1, c5], dtype=torch.float64)
        h, s = per_class_counts(logits, targets, num_classes)
        hits += h.double()
        seen += s.double()
    model.train(was_training)
    totals = all_reduce_sum(torch.cat([counts, hits, seen]).to(device)).cpu()
    n, c1, c5 = totals[:3].tolist()
    hits, seen = totals[3:3 + num_classes], totals[3 + num_classes:]
    present = seen > 0
    mean_pc = float((hits[present] / seen[present]).mean() * 100) if present.any() else 0.0
    n = max(n, 1.0)
    return dict(top1=100 * c1 / n, top5=100 * c5 / n, mean_per_class=mean_pc, n=int(n))
