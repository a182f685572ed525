"""The frozen teacher (PaddleClas SSLD; Beyer et al., "patient and consistent"): one model or an ensemble, its own resolution, BN mode.

The teacher is never wrapped in DDP and never receives gradients. It is called on the student's exact
augmented batch (same crop, flip, mixup); when it runs at another resolution that batch is resized, and
when it was trained with another mean/std the pixels are re-normalised, so it sees the same image.

BatchNorm: `bn: train` (the default, PaddleClas: 76.00 vs 75.84 top-1 for eval mode) normalises with the
batch's statistics; we freeze the running statistics (momentum 0), so the teacher's weights and buffers
stay exactly what was loaded and switching to `bn: eval` later gives the original model. Dropout and
other layers stay in eval mode either way.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.students import zoo
from distill.students.artifact import IMAGENET_MEAN, IMAGENET_STD, check_state_dict, load_student, read_weights
from distill.core.errors import UserError

BN_MODES = ("train", "eval")


def load_teacher_model(source: str, num_classes: int, pretrained: bool = False) -> tuple[nn.Module, dict]:
    """A model + its metadata from an artifact (path or $SSLD_HOME name), a trainer checkpoint (.pt/.pth),
    a zoo name or `timm:ARCH[.tag]` (timm weights when `pretrained` and the network is reachable)."""
    source = str(source)
    if Path(source).suffix in (".pt", ".pth"):
        state, meta, where = read_weights(source)
        model = zoo.create_model(meta["arch"], num_classes=meta["num_classes"])
        check_state_dict(model, state, where)
        model.load_state_dict(state)
        return model, meta
    if zoo.is_zoo_name(source):   # a zoo row as a teacher is its timm architecture
        source = source if source.startswith(zoo.TIMM_PREFIX) else zoo.TIMM_PREFIX + zoo.ZOO[source].arch
        try:
            return load_student(source, num_classes=num_classes, pretrained=pretrained)
        except (RuntimeError, OSError) as e:  # no network, no cached weights
            raise UserError(f"cannot load teacher {source} (pretrained={pretrained}): {e}") from None
    return load_student(source)


def freeze_running_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged in train mode


class Teacher:
    """Frozen teacher(s): `teacher(images)` -> mean of the members' softmax probabilities (float32)."""

    def __init__(self, models, metas, bn: str = "train", input_size: int | None = None,
                 student_mean=IMAGENET_MEAN, student_std=IMAGENET_STD):
        if bn not in BN_MODES:
            raise UserError(f"teacher.bn must be 'train' or 'eval', got {bn!r}")
        self.models, self.metas, self.bn, self.input_size = list(models), list(metas), bn, input_size
        self.student_mean, self.student_std = torch.tensor(student_mean), torch.tensor(student_std)
        self.memory_format = torch.contiguous_format
        for m in self.models:
            m.requires_grad_(False)
            freeze_running_stats(m)
            self._set_mode(m)

    def _set_mode(self, model: nn.Module) -> None:
        model.eval()
        if self.bn == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()

    def to(self, device, memory_format=None) -> "Teacher":
        """memory_format None: channels_last, the layout cuDNN and oneDNN run fastest for a forward-only
        network (measured on CPU: resnet50d 1.45x, resnet18d 1.3x at batch 32, 160 px)."""
        if memory_format is None:
            memory_format = torch.channels_last
        self.memory_format = memory_format if memory_format != torch.preserve_format else torch.contiguous_format
        self.models = [m.to(device, memory_format=memory_format) for m in self.models]
        return self

    def prepare(self, images: torch.Tensor, meta: dict) -> torch.Tensor:
        """The student's batch as this member should see it: its resolution, its mean/std."""
        if self.input_size and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        prep = meta.get("preprocessing", {})
        mean, std = prep.get("mean"), prep.get("std")
        if mean is not None and std is not None and (
                not torch.allclose(torch.tensor(mean), self.student_mean)
                or not torch.allclose(torch.tensor(std), self.student_std)):
            shape = (1, -1, 1, 1)
            s_mean, s_std = (t.to(images).view(shape) for t in (self.student_mean, self.student_std))
            t_mean, t_std = (torch.tensor(v).to(images).view(shape) for v in (mean, std))
            images = (images * s_std + s_mean - t_mean) / t_std
        return images

    def __call__(self, images: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Inference mode (no autograd bookkeeping at all), the batch in the teacher's memory format; the
        caller's autocast applies. The result is cloned out of inference mode: the student's loss may
        save it for backward, which an inference tensor forbids."""
        with torch.inference_mode():
            probs = None
            for model, meta in zip(self.models, self.metas):
                self._set_mode(model)
                x = self.prepare(images, meta).contiguous(memory_format=self.memory_format)
                p = F.softmax(model(x).float() / temperature, dim=1)
                probs = p if probs is None else probs + p
            probs = probs / len(self.models)
        return probs.clone()


def build_teacher(cfg, num_classes: int, student_mean, student_std) -> Teacher | None:
    """The `teacher` config section -> Teacher, or None for the teacher-less mode (`teacher: null`)."""
    if cfg is None or not cfg.get("models"):
        return None
    models, metas = [], []
    for source in cfg["models"]:
        model, meta = load_teacher_model(source, num_classes, pretrained=cfg.get("pretrained", False))
        out = meta.get("num_classes")
        if out != num_classes:
            raise UserError(f"teacher {source} predicts {out} classes but the student has {num_classes}; "
                            "a teacher must share the student's label space")
        models.append(model)
        metas.append(meta)
    return Teacher(models, metas, bn=cfg.get("bn", "train"), input_size=cfg.get("input_size"),
                   student_mean=student_mean, student_std=student_std)
