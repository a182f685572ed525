"""The mining teacher: eval-mode BatchNorm, its own test preprocessing, and the CLI flags that choose it.
"""
from __future__ import annotations


import torch

from distill.students.artifact import IMAGENET_MEAN, IMAGENET_STD, preprocess
from distill.core.errors import UserError, number_in
from distill.core.precision import native_bf16
from distill.teacher import Teacher, load_teacher_model

def load_mining_teacher(sources, num_classes: int = 1000, input_size: int | None = None,
                        pretrained: bool = False):
    """(Teacher in eval mode, eval transform, classes, first model). Eval-mode BatchNorm: an image's score
    does not depend on its batch mates. The transform is the first teacher's test preprocessing."""
    models, metas = [], []
    torch.manual_seed(0)  # a random-init timm: teacher (tests, benchmarks) is then the same on every rank
    for source in sources:
        model, meta = load_teacher_model(source, num_classes, pretrained=pretrained)
        models.append(model)
        metas.append(meta)
    classes = {m["num_classes"] for m in metas}
    if len(classes) > 1:
        raise UserError(f"the teachers {', '.join(sources)} predict different class counts {sorted(classes)}")
    prep = metas[0].get("preprocessing", {})
    size = input_size or int(prep.get("input_size", 224))
    mean, std = prep.get("mean", IMAGENET_MEAN), prep.get("std", IMAGENET_STD)
    transform = preprocess(prep, size)
    teacher = Teacher(models, metas, bn="eval", student_mean=mean, student_std=std)
    return teacher, transform, classes.pop(), models[0]



TRAINED_SOURCES = ("PaddleClas", "timm pretrained")


def untrained_teacher(source: str, meta: dict) -> str | None:
    """Why this teacher has no trained weights, or None. A trainer checkpoint counts as trained; an artifact
    needs a trained origin (converted, timm weights), pretrain results (a top-1) or a fine-tuning's score
    (transfer.finetune keeps the backbone's pretrain record, "random init" included, and adds `transfer`)."""
    if str(source).endswith((".pt", ".pth")):
        return None
    if (meta.get("transfer") or {}).get("score") is not None:
        return None
    pretrain = meta.get("pretrain") or {}
    if pretrain.get("source") == "random init":
        return f"{source} is randomly initialised (a timm:/zoo name without --pretrained)"
    if pretrain.get("source") in TRAINED_SOURCES or pretrain.get("top1") is not None:
        return None
    return f"{source} records no pretrain results (no top-1, no trained origin in its metadata)"


def add_teacher_args(parser):
    parser.add_argument("--teacher", action="append", required=True, metavar="NAME",
                        help="artifact name/path, trainer checkpoint, zoo name or timm:ARCH (repeat: ensemble)")
    parser.add_argument("--num-classes", type=number_in(int, 1), default=1000, help="classes of a timm:/zoo teacher")
    parser.add_argument("--pretrained", action="store_true", help="timm weights for timm: teachers (network)")
    parser.add_argument("--input-size", type=number_in(int, 8), default=None,
                        help="teacher resolution (default: the teacher's preprocessing input_size)")
    parser.add_argument("--batch-size", type=number_in(int, 1), default=64)
    parser.add_argument("--workers", type=number_in(int, 0), default=2, help="DataLoader workers per process")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                        help="teacher autocast: auto = bf16 where the device has it natively (CUDA, AVX512-BF16 or AMX "
                             "CPUs), else off")
    parser.add_argument("--shard-size", type=number_in(int, 1), default=4096,
                        help="images per shard of a folder/list pool (a WebDataset tar is one shard)")


def teacher_amp(amp: str, device) -> str:
    """`auto`: bf16 autocast where the device has native bf16 (teacher pass 2.1x on an AVX512-BF16 CPU core;
    docs/benchmarks.md), fp32 elsewhere."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "off"
    return amp
