"""The chain's defaults, each derived from the data by a stated rule and overridable by the flag it names.

Every value is a `Setting(value, why, flag)`: the console prints `name value (why)` before the first step,
the report repeats the table, and OUT/plan.json keeps it. A value given on the command line prints
`(given)`. The rules are for a first run on a new folder of images, not for a paper's recipe:

- image size: the data's own size (distill.core.image_size), since a model trained at the data's size costs
  the square of the ratio less than one upsampled to 224 px; pretrained models included (pass
  --image-size 224 for ImageNet weights on small images, at that cost).
- batch: about train / 30, rounded down to a power of two in [8, 64], so an epoch has ~30 steps or more.
- epochs: about 2,000 steps for a random init (learning from scratch) and 600 for pretrained weights
  (fine-tuning), within [5, 200] epochs.
- learning rate, per optimizer at the chosen batch: SGD 0.1 per 256 images from scratch (Goyal et al.
  2017), 0.01 per 64 when fine-tuning (transfer.finetune's default); AdamW 1e-3 / 1e-4 per 256.
- k (images mined per class): twice the labeled images per class (SSLD mined about three unlabeled
  images per ImageNet label), at most half the pool's share per class, so that the teacher chooses.
- dedup: on images of 64 px or less the demo's measured fast settings, else distill.mine dedup's own.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from distill.students.artifact import default_test_size

STEPS = {False: 2000, True: 600}        # pretrained? -> optimisation steps to aim for
EPOCHS_RANGE = (5, 200)
BATCH_RANGE = (8, 64)
IMAGES_PER_STEP = 30                    # train / this = the batch before rounding
LR = {  # (optimizer, pretrained) -> (lr, per images, source)
    ("sgd", False): (0.1, 256, "SGD from scratch: 0.1 per 256 images, Goyal et al. 2017"),
    ("sgd", True): (0.01, 64, "SGD fine-tuning: 0.01 per 64 images, transfer.finetune's default"),
    ("adamw", False): (1e-3, 256, "AdamW from scratch: 1e-3 per 256 images"),
    ("adamw", True): (1e-4, 256, "AdamW fine-tuning: 1e-4 per 256 images"),
}
FAST_DEDUP = ["--cos", "0.95", "--candidates", "2", "--sift-size", "96"]
FAST_DEDUP_MAX_SIZE = 64
FIX_EPOCHS = 2


@dataclass
class Setting:
    value: object
    why: str
    flag: str

    def line(self, name: str) -> str:
        shown = " ".join(self.value) if isinstance(self.value, list) else self.value
        shown = shown if shown not in ("", None) else "-"
        return f"{name} {shown} ({self.why}; {self.flag})"


def given_or(value, flag: str, derive) -> Setting:
    """The command line's value when there is one, else `derive()` -> (value, why)."""
    if value is not None:
        return Setting(value, "given", flag)
    derived, why = derive()
    return Setting(derived, why, flag)


def batch_size(n_train: int) -> tuple[int, str]:
    raw = max(n_train / IMAGES_PER_STEP, 1.0)
    b = min(BATCH_RANGE[1], max(BATCH_RANGE[0], 2 ** int(math.floor(math.log2(raw)))))
    return b, (f"{n_train} train images / {IMAGES_PER_STEP} rounded down to a power of two in "
               f"[{BATCH_RANGE[0]}, {BATCH_RANGE[1]}]")


def epochs(n_train: int, batch: int, pretrained: bool) -> tuple[int, str]:
    per_epoch = math.ceil(n_train / batch)
    target = STEPS[pretrained]
    e = min(EPOCHS_RANGE[1], max(EPOCHS_RANGE[0], math.ceil(target / per_epoch)))
    kind = "pretrained weights, fine-tuning" if pretrained else "random init, learning from scratch"
    return e, f"about {target} steps at {per_epoch} per epoch ({kind}), within {EPOCHS_RANGE[0]}-{EPOCHS_RANGE[1]}"


def learning_rate(optimizer: str, pretrained: bool, batch: int) -> tuple[float, str]:
    base, per, source = LR[(optimizer, pretrained)]
    return float(f"{base * batch / per:.3g}"), f"{source}, scaled to batch {batch}"


def mining_k(train_counts: dict, pool_size: int | None) -> tuple[int, str]:
    per_class = int(statistics.median(train_counts.values()))
    k, why = 2 * per_class, f"twice the {per_class} labeled images per class (median)"
    if pool_size:
        cap = pool_size // (2 * len(train_counts))
        if cap < k:
            k, why = cap, f"{why} = {2 * per_class}, capped at half the pool's share per class ({pool_size} / " \
                          f"{len(train_counts)} / 2) so the teacher chooses"
    return max(1, k), why


def dedup_settings(image_size: int) -> tuple[list[str], str]:
    if image_size <= FAST_DEDUP_MAX_SIZE:
        return list(FAST_DEDUP), (f"images of {image_size} px: the demo's fast settings (measured on its 32 px pool: "
                                  "17 s instead of 265 s, 33 of 40 planted copies found, the defaults 34)")
    return [], "distill.mine dedup's defaults (they suit photos)"


def derive(args, data, own_size: tuple[int | None, str], pool_size: int | None, teacher_pretrained: bool | None,
           student_pretrained: bool, student_optimizer: str) -> dict[str, Setting]:
    """Every setting the steps read, from the parsed flags (`args`: None where not given) and the data.
    `teacher_pretrained` None: the teacher is used as given, so it has no training settings."""
    s: dict[str, Setting] = {}
    s["image_size"] = given_or(args.image_size, "--image-size",
                               lambda: own_size if own_size[0] else (224, f"{own_size[1]}: 224"))
    size = s["image_size"].value
    s["test_size"] = given_or(args.test_size, "--test-size", lambda: (
        default_test_size(size), f"about 1.15x {size} px (FixRes), rounded"))
    s["batch_size"] = given_or(args.batch_size, "--batch-size", lambda: batch_size(data.n_train))
    batch = s["batch_size"].value
    if teacher_pretrained is not None:
        s["teacher_epochs"] = given_or(args.teacher_epochs, "--teacher-epochs",
                                       lambda: epochs(data.n_train, batch, teacher_pretrained))
        s["teacher_lr"] = given_or(args.teacher_lr, "--teacher-lr",
                                   lambda: learning_rate("sgd", teacher_pretrained, batch))
    s["epochs"] = given_or(args.epochs, "--epochs", lambda: epochs(data.n_train, batch, student_pretrained))
    s["lr"] = given_or(args.lr, "--lr", lambda: learning_rate(student_optimizer, student_pretrained, batch))
    s["fix_epochs"] = given_or(args.fix_epochs, "--fix-epochs", lambda: (
        FIX_EPOCHS, "transfer.finetune's default: only the classifier trains"))
    if pool_size is not None or args.unlabeled:
        s["k"] = given_or(args.k, "--k", lambda: mining_k(data.train_counts, pool_size))
        s["dedup"] = Setting(*dedup_settings(size), "-o dedup.FLAG=VALUE")
    return s
