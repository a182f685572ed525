"""SSLD on your own images, in one command: a teacher, a labels-only baseline and an SSLD student, a report.

    python -m distill.chain --data DATA [--unlabeled POOL] --teacher T --student S [--pretrained] OUT

DATA is an ImageFolder (train/<class>/*, and val/<class>/* or a seeded split of train); POOL a folder of
images, a list file or WebDataset shards; T and S any name the kit resolves (an artifact path or name such
as r50_vd_ssld, local-dir:FOLDER, hf-hub:ORG/NAME, a zoo name, timm:ARCH with --pretrained for timm's
weights). The steps, each skipped when its outputs exist (--force redoes, --until STEP stops after one):

    data      check DATA and POOL, split val if needed, derive the defaults   OUT/plan.json
    teacher   T fine-tuned on DATA by transfer.finetune, unless it already     OUT/teacher/model.safetensors
              predicts DATA's classes (names compared; else the count, warned)
    init      S with DATA's classifier, seeded: both students start here       OUT/init/init.safetensors
    baseline  the student from the labels alone (distill.ssld, loss ce)       OUT/baseline/baseline.safetensors
    mining    POOL deduplicated against val, the teacher's top-k per class     OUT/mined/ssld_train_list.txt
    ssld      the student from the teacher's soft labels on train + mined      OUT/ssld/ssld_student.safetensors
              (distill.ssld, label-free loss; train alone without --unlabeled)
    fix       both students' classifiers at the test resolution (FixRes)      OUT/fix/{baseline,ssld}/
    export    the SSLD student at its best val resolution: ONNX (parity-       OUT/export/ssld_student/
              checked, class names) + a timm / Hugging Face folder
    report    teacher, baseline and SSLD student side by side                 OUT/report.md, report.png, summary.json

Why these trainers: the baseline and the SSLD student both run distill.ssld from the same init artifact,
with the same recipe (configs/chain_student.yaml), batch, schedule and number of steps; only the loss
(labels vs the teacher's soft labels) and the data (train vs train + mined) differ, so the gap is SSLD's
and not a recipe's (transfer.finetune would bring other augmentation, multipliers and optimizer
settings to one side only). The teacher is a fine-tuning job, which is what transfer.finetune is for (a
new classifier, matched weight decay, the artifact's multipliers); Fix is its classifier-only stage.
Every default is printed as `name value (why; flag)` before the first step; -o STEP.KEY=VALUE passes a
setting to one step's trainer (STEP: teacher, baseline, ssld, students = both, fix, dedup, mine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distill.chain import steps
from distill.chain.data import ChainData, read_data, read_pool
from distill.chain.defaults import Setting, derive
from distill.chain.report import terminal_summary, write_report
from distill.chain.sequence import run_steps
from distill.chain.runner import StepRunner, Until, set_threads
from distill.core.atomic import atomic_write
from distill.core.errors import ArgumentParser, UserError, number_in, run_cli
from distill.core.image_size import own_resolution
from distill.core.trainer_kit import default_workers
from distill.students.artifact import class_names, read_meta

STEPS = ("data", "teacher", "init", "baseline", "mining", "ssld", "fix", "export", "report")
PASSTHROUGH = ("teacher", "baseline", "ssld", "students", "fix", "dedup", "mine")
FINETUNE_MODES = ("auto", "yes", "no")


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m distill.chain", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out", help="folder for the runs, the artifacts and the report (e.g. runs/chain)")
    p.add_argument("--data", required=True, help="ImageFolder: DATA/train/<class>/* and DATA/val/<class>/* (or none)")
    p.add_argument("--unlabeled", metavar="POOL", help="unlabeled images: a folder, a list file or WebDataset shards")
    p.add_argument("--teacher", required=True, help="artifact, local-dir:, hf-hub:, zoo name or timm:ARCH")
    p.add_argument("--student", required=True, help="artifact, local-dir:, hf-hub:, zoo name or timm:ARCH")
    p.add_argument("--pretrained", action="store_true", help="timm's weights for timm: and zoo names (network or cache)")
    p.add_argument("--teacher-finetune", choices=FINETUNE_MODES, default="auto",
                   help="auto: fine-tune T unless it already predicts DATA's classes; yes: always; no: never")
    for flag, kind, low, text in (
            ("--image-size", int, 16, "train resolution of every model (default: the data's own size)"),
            ("--test-size", int, 16, "test resolution for Fix (default about 1.15x)"),
            ("--batch-size", int, 1, "batch of every trainer (default from the train size)"),
            ("--epochs", int, 1, "epochs of both students (default: about 2,000 or 600 steps)"),
            ("--teacher-epochs", int, 1, "epochs of the teacher's fine-tuning"),
            ("--lr", float, 0.0, "the students' learning rate at the chosen batch"),
            ("--teacher-lr", float, 0.0, "the teacher's learning rate at the chosen batch"),
            ("--fix-epochs", int, 1, "epochs of the Fix stage"),
            ("--k", int, 1, "pool images mined per class"),
            ("--workers", int, 0, "data loader processes (default: the cores less one)"),
            ("--threads", int, 1, "torch threads (default: $OMP_NUM_THREADS, else the cores less one)")):
        p.add_argument(flag, type=number_in(kind, low, low_open=kind is float), default=None, help=text)
    p.add_argument("--val-fraction", type=number_in(float, 0, 0.9, low_open=True), default=0.2,
                   help="share of each class held out as val when DATA has no val/ (default 0.2)")
    p.add_argument("--seed", type=number_in(int, 0), default=0, help="seeds the split, the inits and every trainer")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("-o", dest="passthrough", action="append", default=[], metavar="STEP.KEY=VALUE",
                   help=f"a setting for one step's trainer; STEP: {', '.join(PASSTHROUGH)}")
    p.add_argument("--no-onnx", action="store_true", help="export the timm / Hugging Face folder without model.onnx")
    p.add_argument("--force", action="store_true", help="redo every step")
    p.add_argument("--until", choices=STEPS, help="stop after this step (--until data: print the plan only)")
    p.add_argument("--quiet", action="store_true", help="trainer output to OUT/chain.log, only steps on the console")
    return p.parse_args(argv)


def split_passthrough(items) -> dict[str, list[str]]:
    """['ssld.optim.lr=0.1', 'dedup.cos=0.9'] -> {'ssld': ['optim.lr=0.1'], 'dedup': ['cos=0.9']}."""
    out: dict[str, list[str]] = {k: [] for k in PASSTHROUGH}
    for item in items:
        step, _, rest = item.partition(".")
        if step not in out or "=" not in rest:
            raise UserError(f"-o {item!r}: expected STEP.KEY=VALUE with STEP one of {', '.join(PASSTHROUGH)} "
                            "(e.g. -o ssld.optim.weight_decay=5e-5, -o dedup.cos=0.9)")
        out[step].append(rest)
    return out


# ---------------------------------------------------------------------------------------------------
# The plan: every check and every default, before the first step.

@dataclass
class Plan:
    args: argparse.Namespace
    out: Path
    data: ChainData
    pool_size: int | None
    pool_kind: str | None
    settings: dict[str, Setting]
    finetune_teacher: bool
    teacher_why: str
    student_pretrained: bool
    passthrough: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)

    @property
    def workers(self) -> int:
        return self.args.workers if self.args.workers is not None else default_workers()

    def value(self, name: str):
        return self.settings[name].value


def teacher_decision(name: str, classes: list[str], mode: str, pretrained: bool) -> tuple[bool, str]:
    """(fine-tune?, why): T is used as given only when it already predicts DATA's classes."""
    if steps.is_architecture(name):
        if mode == "no":
            raise UserError(f"--teacher-finetune no: {name} is an architecture without DATA's classifier; "
                            "give a teacher trained on DATA's classes, or drop --teacher-finetune no")
        return True, f"{name} is an architecture, {'timm weights' if pretrained else 'random init'}"
    meta = read_meta(name)
    names, count = class_names(meta), meta["num_classes"]
    if names is not None:
        same, detail = names == classes, f"its {count} class names " + (
            "are DATA's, in order" if names == classes else f"differ from DATA's (e.g. {names[0]!r} vs {classes[0]!r})")
    else:
        same = count == len(classes)
        detail = f"it records no class names; it predicts {count} classes" + (
            " like DATA: assumed to be DATA's in sorted folder order (--teacher-finetune yes if not)" if same else
            f", DATA has {len(classes)}")
    if mode == "no" and not same:
        raise UserError(f"--teacher-finetune no: teacher {name} was trained on other classes ({detail}); "
                        "drop --teacher-finetune no so the chain fine-tunes it on DATA")
    if mode == "yes":
        return True, f"--teacher-finetune yes; {detail}"
    return not same, detail


def teacher_verb(finetune: bool) -> str:
    return "fine-tuned on DATA" if finetune else "used as given"


def students_optimizer(passthrough) -> str:
    for item in passthrough["students"] + passthrough["ssld"] + passthrough["baseline"]:
        if item.startswith("optim.name="):
            return item.split("=", 1)[1].strip()
    return "sgd"


def make_plan(args) -> Plan:
    out = Path(args.out)
    passthrough = split_passthrough(args.passthrough)
    steps.check_model_name(args.teacher, "--teacher")
    steps.check_model_name(args.student, "--student")
    if args.pretrained and not (steps.is_architecture(args.teacher) or steps.is_architecture(args.student)):
        raise UserError("--pretrained loads timm's weights for timm: and zoo names; the teacher and the student "
                        "here are artifacts with weights of their own: drop --pretrained")
    data = read_data(args.data, out, args.val_fraction, args.seed)
    pool = read_pool(args.unlabeled) if args.unlabeled else None
    finetune, why = teacher_decision(args.teacher, data.classes, args.teacher_finetune, args.pretrained)
    optimizer = students_optimizer(passthrough)
    if optimizer not in ("sgd", "adamw"):
        raise UserError(f"-o ...optim.name={optimizer}: expected sgd or adamw")
    teacher_pretrained = steps.is_pretrained(args.teacher, args.pretrained)
    student_pretrained = steps.is_pretrained(args.student, args.pretrained)
    own = own_resolution(data.train_files) if args.image_size is None else (None, "")
    settings = derive(args, data, own, pool.size if pool else None, teacher_pretrained if finetune else None,
                      student_pretrained, optimizer)
    plan = Plan(args, out, data, pool.size if pool else None, pool.kind if pool else None, settings, finetune, why,
                student_pretrained, passthrough)
    if not args.unlabeled:
        plan.notes.append("no --unlabeled: the SSLD student distils on train alone (its labels unused)")
    if args.until != "data" and not args.no_onnx and not steps.onnx_available():
        plan.notes.append("onnx / onnxruntime are not installed: the export has no model.onnx and the report no "
                          "ONNX Runtime figures (pip install 'ssld-kit[onnx]')")
    return plan


def describe(plan: Plan) -> list[str]:
    d = plan.data
    lines = [f"DATA: {len(d.classes)} classes, train {d.n_train} images ({d.train}), val {d.n_val} ({d.split})"
             + ("; classes unbalanced: mean per-class accuracy reported" if d.unbalanced else "")]
    if plan.args.unlabeled:
        size = f"{plan.pool_size} images" if plan.pool_size is not None else "WebDataset shards"
        lines.append(f"POOL: {plan.args.unlabeled} ({size})")
    lines.append(f"teacher {plan.args.teacher}: {teacher_verb(plan.finetune_teacher)} ({plan.teacher_why})")
    lines.append(f"student {plan.args.student}: the baseline and the SSLD student both start from "
                 f"{plan.out / 'init' / 'init.safetensors'} ({'pretrained' if plan.student_pretrained else 'random init'})")
    lines += plan.notes
    lines.append("defaults (name value (why; the flag that overrides it)):")
    lines += ["  " + s.line(name) for name, s in plan.settings.items()]
    return lines


def plan_record(plan: Plan) -> dict:
    return dict(data=str(plan.args.data), view=str(plan.data.root), split=plan.data.split, classes=plan.data.classes,
                train_counts=plan.data.train_counts, val_counts=plan.data.val_counts, unbalanced=plan.data.unbalanced,
                unlabeled=plan.args.unlabeled,
                pool_size=plan.pool_size, teacher=plan.args.teacher, student=plan.args.student,
                pretrained=plan.args.pretrained, finetune_teacher=plan.finetune_teacher, teacher_why=plan.teacher_why,
                settings={k: dict(value=s.value, why=s.why, flag=s.flag) for k, s in plan.settings.items()},
                passthrough=plan.passthrough, seed=plan.args.seed, notes=plan.notes)


def changed_settings(path: Path, record: dict) -> str:
    """'epochs 8 -> 10, k 60 -> 30' between OUT/plan.json and this run's plan ('' when none or the same)."""
    try:
        before = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return ""
    now = record["settings"]
    return ", ".join(f"{k} {before[k]['value']} -> {now[k]['value']}" for k in now
                     if k in before and before[k]["value"] != now[k]["value"])


# ---------------------------------------------------------------------------------------------------
# main

def main(argv=None):
    args = parse(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    plan = make_plan(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    plan.data.write_view()
    runner = StepRunner(plan.out, force=args.force, quiet=args.quiet, until=args.until)
    for line in describe(plan):
        runner.say(line)
    record = plan_record(plan)
    changed = changed_settings(plan.out / "plan.json", record)
    if changed and not args.force:
        runner.say(f"settings differ from the previous run's ({changed}): finished steps keep their outputs; "
                   "--force redoes them")
    atomic_write(plan.out / "plan.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    atomic_write(plan.out / "classes.txt", lambda tmp: Path(tmp).write_text("\n".join(plan.data.classes) + "\n"))
    try:
        runner.reached("data")
        summary = run_steps(plan, runner)
    except Until as stop:
        runner.say(f"stopped after {stop} (--until)")
        return None
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_report(plan.out, summary)
    print(terminal_summary(summary))
    print(f"report: {plan.out / 'report.md'}, {plan.out / 'report.png'}, {plan.out / 'summary.json'} "
          f"(steps {summary['chain_seconds']:.0f} s, this run {summary['seconds']:.0f} s)", file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_cli(main)
