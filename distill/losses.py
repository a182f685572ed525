"""Distillation losses (PaddleClas DMLLoss and the usual KD losses): ssld, jsd, kl, soft_ce, plus an optional hard-label CE.

Every soft loss takes student logits and teacher *probabilities*: an ensemble of teachers is the mean of
their probabilities, so the teacher side is always a distribution. None of them needs a label, which is
what lets unlabeled images join the training set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.core.cross_entropy import IGNORE, hard_ce_loss  # noqa: F401  (IGNORE: re-exported)
from distill.core.errors import UserError

EPS = 1e-12  # PaddleClas DMLLoss eps
SOFT_LOSSES = ("ssld", "jsd", "kl", "soft_ce")
LOSS_KINDS = SOFT_LOSSES + ("ce",)


def ssld_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """PaddleClas DMLLoss / "JSDivLoss": the symmetrised KL 0.5*[KL(q||p) + KL(p||q)], eps inside the logs.

    PaddleClas multiplies the per-element cost by the class count and takes the mean over all elements,
    which is the sum over classes averaged over the batch, as written here.
    """
    p = F.softmax(student_logits.float(), dim=1)
    q = teacher_probs.float()
    cost = q * torch.log((q + EPS) / (p + EPS)) + p * torch.log((p + EPS) / (q + EPS))
    return 0.5 * cost.sum(dim=1).mean()


def jsd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """The true Jensen-Shannon divergence 0.5*KL(q||m) + 0.5*KL(p||m), m = (p+q)/2 (bounded by log 2)."""
    p = F.softmax(student_logits.float(), dim=1)
    q = teacher_probs.float()
    m = 0.5 * (p + q)
    log_m = torch.log(m + EPS)
    kl_qm = (q * (torch.log(q + EPS) - log_m)).sum(dim=1)
    kl_pm = (p * (torch.log(p + EPS) - log_m)).sum(dim=1)
    return (0.5 * kl_qm + 0.5 * kl_pm).mean()


def kl_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al.: KL(q_T || p_T) * T^2. `teacher_probs` must already be softened at the same T."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    q = teacher_probs.float()
    return (q * (torch.log(q + EPS) - log_p)).sum(dim=1).mean() * temperature ** 2


def soft_ce_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the teacher's distribution as target: -sum q log p."""
    return -(teacher_probs.float() * F.log_softmax(student_logits.float(), dim=1)).sum(dim=1).mean()


class DistillLoss:
    """The configured objective: `weight * soft(student, teacher) + hard_weight * CE(student, labels)`.

    kind `ce` is the teacher-less mode (train a teacher, or a labels-only baseline): CE alone.
    Returns (total, parts) where parts holds each term as a float for logging.
    """

    def __init__(self, kind: str = "ssld", temperature: float = 1.0, weight: float = 1.0,
                 hard_weight: float = 0.0, label_smoothing: float = 0.0):
        if kind not in LOSS_KINDS:
            raise UserError(f"unknown loss.kind {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
        if temperature <= 0:
            raise UserError(f"loss.temperature must be > 0, got {temperature}")
        self.kind, self.temperature, self.weight = kind, temperature, weight
        self.hard_weight = 1.0 if kind == "ce" else hard_weight
        self.label_smoothing = label_smoothing

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "ce"

    @property
    def needs_labels(self) -> bool:
        return self.hard_weight > 0

    @property
    def teacher_temperature(self) -> float:
        """The temperature the teacher's softmax must use (only `kl` softens)."""
        return self.temperature if self.kind == "kl" else 1.0

    def soft(self, student_logits, teacher_probs):
        if self.kind == "ssld":
            return ssld_loss(student_logits, teacher_probs)
        if self.kind == "jsd":
            return jsd_loss(student_logits, teacher_probs)
        if self.kind == "kl":
            return kl_loss(student_logits, teacher_probs, self.temperature)
        return soft_ce_loss(student_logits, teacher_probs)

    def __call__(self, student_logits, teacher_probs=None, labels=None, mix=None):
        parts = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        if self.needs_teacher:
            soft = self.soft(student_logits, teacher_probs)
            parts[f"loss_{self.kind}"] = soft
            total = total + self.weight * soft
        if self.hard_weight > 0:
            hard = hard_ce_loss(student_logits, labels, mix, self.label_smoothing)
            parts["loss_ce"] = hard
            total = total + self.hard_weight * hard
        return total, parts

