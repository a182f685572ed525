"""The chain's steps as `distill.chain` and `distill.demo` both run them: each builds a trainer's or miner's
command line, runs it in this process through the StepRunner (skipped when its outputs exist) and returns
what the next step reads. A step is what a user would otherwise type, so every run folder also holds the
exact command it took (`OUT/STEP/command.txt`).

    materialize_step   a `timm:`/zoo name -> an artifact with DATA's classes (seeded; pretrained or not),
                       so two runs that start from "the same initialisation" start from the same tensors
    finetune_step      transfer.finetune (the teacher on DATA; Fix with 0 fine-tuning epochs)
    student_step       distill.ssld (labels only: loss ce; SSLD: a teacher, the label-free loss)
    mining_step        distill.mine dedup against val, then distill.mine top-k per class
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.chain.runner import StepRunner, overrides
from distill.core.atomic import atomic_write
from distill.core.errors import UserError
from distill.students import zoo
from distill.students.artifact import (build_meta, class_names, load_student, preprocessing, read_meta,
                                       resolve_student, save_student, with_classes)


def write_command(folder: Path, module: str, argv) -> None:
    line = "python -m " + module + " " + " ".join(shlex.quote(str(a)) for a in argv)
    atomic_write(Path(folder) / "command.txt", lambda tmp: Path(tmp).write_text(line + "\n"))


# ---------------------------------------------------------------------------------------------------
# Names -> weights.

def is_architecture(name: str) -> bool:
    """A name that builds an architecture (`timm:ARCH`, a zoo row) rather than naming trained weights."""
    return zoo.is_zoo_name(str(name))


def check_model_name(name: str, role: str) -> None:
    """Fail before any step on a name that resolves to nothing: an unknown architecture or a missing artifact."""
    if is_architecture(name):
        zoo.get_entry(name)   # unknown timm or zoo names say so, with the nearest names
        return
    try:
        resolve_student(name)
    except UserError as e:
        raise UserError(f"{role} {name} does not resolve: {e}") from None


def is_pretrained(name: str, pretrained: bool) -> bool:
    """Whether the weights a step starts from were trained (timm's, an artifact's, a fine-tuning's) or are a
    random init: the rule distill.mine dedup applies to its teacher."""
    from distill.mine.teacher import untrained_teacher
    if is_architecture(name):
        return pretrained
    return untrained_teacher(name, read_meta(name)) is None


def onnx_available() -> bool:
    """onnx and onnxruntime (the `onnx` extra) are importable: the export writes model.onnx only then."""
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def materialize(name: str, path: Path, *, pretrained: bool, classes, classes_source: str, size: int,
                test_size: int, seed: int) -> Path:
    """`name` with a classifier for `classes`, saved as an artifact: seeded random init or timm's weights for
    `timm:`/zoo names, the artifact's weights (new classifier unless the classes already match) otherwise."""
    torch.manual_seed(seed)
    try:
        if zoo.is_zoo_name(str(name)) and not str(name).startswith(zoo.TIMM_PREFIX):
            model = zoo.create_model(name, num_classes=len(classes), pretrained=pretrained)
            meta = build_meta(name, len(classes), model=model,
                              pretrain=dict(source="timm pretrained" if pretrained else "random init"))
        else:
            model, meta = load_student(name, num_classes=len(classes), pretrained=pretrained)
    except (RuntimeError, OSError) as e:   # timm weights: no network and no cache
        raise UserError(f"cannot load {name} (pretrained={pretrained}): {type(e).__name__}: {e}") from None
    if not is_architecture(name) and class_names(meta) != list(classes):
        model.reset_classifier(len(classes))   # a classifier for other (or unnamed) classes: start it afresh
    prep = meta["preprocessing"]
    meta["preprocessing"] = preprocessing(size, test_size, prep["crop_pct"], prep["mean"], prep["std"],
                                          prep.get("interpolation", "bilinear"))
    save_student(path, model, with_classes(meta, classes, classes_source))
    return path


def materialize_step(runner: StepRunner, name: str, source: str, folder: Path, **kwargs) -> Path:
    path = Path(folder) / "init.safetensors"
    runner.step(name, [path], lambda: materialize(source, path, **kwargs), folders=[folder])
    return path


# ---------------------------------------------------------------------------------------------------
# Trainers.

def finetune_step(runner: StepRunner, name: str, folder: Path, argv: list, outputs=("results.json",)) -> dict:
    """transfer.finetune with `argv` (its flags) into `folder`; returns its results.json."""
    from transfer import finetune
    argv = [*argv, "--out-dir", str(folder)]

    def run():
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_command(folder, "transfer.finetune", argv)
        finetune.main(argv)

    runner.step(name, [Path(folder) / o for o in outputs], run, folders=[folder])
    return json.loads((Path(folder) / "results.json").read_text())


def student_step(runner: StepRunner, name: str, folder: Path, recipe, export_name: str, values=()) -> Path:
    """distill.ssld on `recipe` (a recipe name or YAML path) with -o `values` into `folder`; the artifact."""
    from distill import ssld
    artifact = Path(folder) / f"{export_name}.safetensors"
    argv = ["-c", str(recipe), "--out-dir", str(folder), *overrides(values)]

    def run():
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_command(folder, "distill.ssld", argv)
        ssld.main(argv)

    runner.step(name, [artifact], run, folders=[folder])
    return artifact


# ---------------------------------------------------------------------------------------------------
# Mining.

@dataclass
class Mined:
    """The mining step's files: dedup's kept / removed lists, the mined list, and what SSLD trains on."""
    folder: Path
    wds: bool = False

    kept = property(lambda self: self.folder / "pool_kept.txt")
    removed = property(lambda self: self.folder / "pool_kept_removed.tsv")
    dedup_summary = property(lambda self: self.folder / "pool_kept_summary.json")
    mined = property(lambda self: self.folder / "mined.txt")
    mined_summary = property(lambda self: self.folder / "mined_summary.json")
    merged = property(lambda self: self.folder / "ssld_train_list.txt")
    shards = property(lambda self: self.folder / "shards")

    @property
    def done(self) -> Path:
        return self.mined_summary if self.wds else self.merged

    def train_sources(self, train: dict) -> list[dict]:
        """SSLD's data.train: the merged list (train + mined), or for WebDataset pools train + mined shards."""
        if self.wds:
            return [train, dict(type="wds", path=str(self.shards / "mined-*.tar"))]
        return [dict(type="list", path=str(self.merged))]


def mining_step(runner: StepRunner, name: str, folder: Path, *, teacher, pool: str, against, merge_with, k: int,
                class_names=None, dedup_args=(), mine_args=(), workers: int = 0, device: str = "cpu",
                wds: bool = False) -> Mined:
    """Dedup the pool against `against` (val), then the teacher's top-k per class merged with `merge_with`
    (the labeled train list or folder). WebDataset pools: the removed list is excluded and the mined
    samples copied into shards."""
    from distill.mine import dedup, mining
    m = Mined(Path(folder), wds)
    common = ["--teacher", str(teacher), "--workers", str(workers), "--device", device]

    def run():
        dedup_argv = [*common, "--pool", str(pool), "--against", str(against), "-o", str(m.kept), *dedup_args]
        mine_argv = [*common, "--pool", str(m.kept if not wds else pool), "--k", str(k), "-o", str(m.mined),
                     *(["--class-names", str(class_names)] if class_names else []),
                     *(["--exclude", str(m.removed), "--write-shards", str(m.shards)] if wds else
                       ["--merge-with", str(merge_with), "--merged", str(m.merged)]),
                     "--no-progress", "--fresh", *mine_args]
        m.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(m.folder / "command.txt", lambda tmp: Path(tmp).write_text(
            "".join(f"python -m distill.mine {pre}{' '.join(shlex.quote(a) for a in argv)}\n"
                    for pre, argv in (("dedup ", dedup_argv), ("", mine_argv)))))
        dedup.main(dedup_argv)
        mining.main(mine_argv)

    runner.step(name, [m.done], run, folders=[m.folder])
    return m
