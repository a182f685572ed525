"""The whole SSLD story on generated data, in one command: python -m distill.demo OUT [--seed N] [--force].

    data         OUT/data, OUT/downstream    8 shape classes (the teacher's labels, a 40-per-class labeled
                                             subset, a pool half off-topic with copies of val images) and
                                             a downstream task of 4 new shapes with 10 labels each
    teacher      OUT/teacher                 from every train label                     (recipe demo_teacher)
    student      OUT/student                 SSLD: labeled subset + raw pool, no labels         (recipe demo)
    labels_only  OUT/labels_only             the chain's baseline: the student from the labeled subset
                                                                                    (recipe demo_labels_only)
    mining       OUT/data/mined              the chain's mining: dedup the pool against val, the teacher's
                                             top-k per class
    mined        OUT/mined_student           the chain's SSLD student: labeled subset + mined list
                                                                                         (recipe demo_mined)
    transfer     OUT/transfer/*              SSLD student, labels-only student, random init on the downstream
                                             task, reduced and uniform multipliers, then Fix (transfer/demo)
    detection    OUT/detection/*             Faster R-CNN on each as the backbone            (detection/demo)
    report       OUT/summary.json, OUT/report.md, OUT/report.png

This is `python -m distill.chain`'s step runner and steps (distill/chain/runner.py, distill/chain/steps.py)
on generated data, with the demo's own recipes instead of the chain's data-derived defaults (they were
tuned for these 32 px scenes and keep the README's figures), plus two steps the chain has no use for: the
student on the raw pool (what mining buys) and the downstream tasks. Every student gets the same number of
training steps (data.epoch_samples), so a gap is the data and the teacher, not a longer run. A step whose
output exists is skipped (an interrupted demo continues; each trainer also resumes its own checkpoint);
--force redoes every step, --until STEP stops after STEP. Recipes come from the installed package
(distill.core.recipes), so the demo runs from any folder after a plain `pip install`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distill.chain.runner import StepRunner, Until, overrides, set_threads
from distill.chain.steps import finetune_step, mining_step, student_step
from distill.core.demo_data import PRESETS, generate
from distill.core.demo_scenes import is_off_topic
from distill.core.errors import ArgumentParser, UserError, run_cli
from distill.core.recipes import resolve_recipe
from distill.demo_report import BACKBONES, CLASSIFICATION_ROWS, MULTIPLIERS, format_tables, gaps, write_report

__all__ = ["BACKBONES", "CLASSIFICATION_ROWS", "MULTIPLIERS", "SCALES", "STEPS", "main"]

STEPS = ("data", "teacher", "student", "labels_only", "mining", "mined", "transfer", "detection", "report")
RANDOM_INIT = "timm:test_resnet"   # the students' architecture at random init
MINE_K = 120                       # pool images kept per class (the pool holds ~190 on-topic per class)
# Dedup at the demo's 32 px: a copy's teacher features are nearly identical (cosine >= 0.95), and SIFT
# needs no 256 px upscale. Measured on the demo pool: 17 s instead of 265 s, 33 of 40 copies found
# either way (the defaults: 34).
DEDUP = ["--cos", "0.95", "--candidates", "2", "--sift-size", "96"]

# Sizes. `demo` is the real run; `tiny` checks the wiring in seconds (tests).
SCALES = {
    "demo": dict(data=PRESETS["demo"], downstream=PRESETS["downstream"], ssld=[], transfer=[], detection=[]),
    "tiny": dict(
        data=dict(PRESETS["demo"], train_per_class=6, labeled_per_class=3, val_per_class=3, unlabeled=24,
                  val_copies=2),
        downstream=dict(PRESETS["downstream"], train_per_class=3, val_per_class=3),
        ssld=["schedule.epochs=1", "data.epoch_samples=16", "data.batch_size=8", "run.workers=0"],
        transfer=["--epochs", "1", "--fix-epochs", "1", "--batch-size", "4", "--workers", "0"],
        detection=["schedule.iterations=2", "schedule.steps=[1]", "schedule.warmup_iters=1", "data.batch_size=2",
                   "optim.base_batch=2", "data.eval_batch_size=2", "run.checkpoint_period=0", "run.workers=0",
                   "run.log_period=1", "model.rpn_post_nms_train=50", "model.rpn_post_nms_test=50",
                   "model.roi_batch_per_image=32"],
    ),
}


class Demo:
    """The demo's steps on a StepRunner: generated data, its recipes, the downstream tasks."""

    def __init__(self, runner: StepRunner, seed: int, scale: str):
        self.runner, self.out, self.seed, self.scale_name = runner, runner.out, seed, scale
        self.scale = SCALES[scale]

    def data(self):
        for name, folder in (("data", self.out / "data"), ("downstream", self.out / "downstream")):
            self.runner.step(f"data:{name}", [folder / "demo_data.json"],
                             lambda f=folder, n=name: generate(f, overwrite=True, **{**self.scale[n], "seed": self.seed}),
                             folders=[folder])

    def ssld(self, name: str, recipe: str, export: str, extra=()) -> Path:
        values = [f"data.root={self.out / 'data'}", f"run.seed={self.seed}", "run.progress=false", *extra,
                  *self.scale["ssld"]]
        return student_step(self.runner, name, self.out / name, resolve_recipe(recipe), export, values)

    def mining(self, teacher: Path):
        data = self.out / "data"
        return mining_step(self.runner, "mining", data / "mined", teacher=teacher, pool=data / "unlabeled_list.txt",
                           against=data / "val", merge_with=data / "labeled_list.txt", k=self.mine_k(),
                           class_names=data / "classes.txt", dedup_args=DEDUP, workers=0, device="cpu")

    def mine_k(self) -> int:
        d = self.scale["data"]
        on_topic = d["unlabeled"] * (1 - d["unlabeled_empty"]) / d["num_classes"]
        return max(1, min(MINE_K, int(on_topic * 0.65)))

    def transfer(self, backbones: dict) -> dict:
        results = {}
        for label, backbone in backbones.items():
            for mult, values in MULTIPLIERS.items():
                argv = ["-c", str(resolve_recipe("transfer/demo")), "--dataset", f"folder:{self.out / 'downstream'}",
                        "--backbone", str(backbone), "--seed", str(self.seed),
                        "--lr-mult", ",".join(f"{v:g}" for v in values), "--fix", "--no-progress",
                        *self.scale["transfer"]]
                results[(label, mult)] = finetune_step(self.runner, f"transfer:{label}:{mult}",
                                                       self.out / "transfer" / f"{label}_{mult}", argv)
        return results

    def detection(self, backbones: dict) -> dict:
        from detection import train
        data, results = self.out / "data", {}
        for label, backbone in backbones.items():
            folder = self.out / "detection" / label
            values = [f"data.train_json={data / 'annotations' / 'instances_train_main.json'}", f"data.train_images={data}",
                      f"data.val_json={data / 'annotations' / 'instances_val_main.json'}", f"data.val_images={data}",
                      f"run.seed={self.seed}", "run.progress=false", *self.scale["detection"]]
            argv = ["-c", str(resolve_recipe("detection/demo")), "--backbone", str(backbone), "--out-dir", str(folder),
                    *overrides(values)]
            self.runner.step(f"detection:{label}", [folder / "metrics.json"], lambda a=argv: train.main(a),
                             folders=[folder])
            results[label] = json.loads((folder / "metrics.json").read_text())
        return results


def read_artifact(path: Path) -> dict:
    from distill.students.artifact import read_meta
    meta = read_meta(path)
    p = meta["pretrain"]
    return dict(arch=meta["arch"], top1=p["top1"], top1_test_res=p["top1_test_res"], epochs=p["epochs"],
                artifact=str(path))


def pool_stats(out: Path, seed: int, empty: float) -> dict:
    """What mining kept: pool size, val copies dedup removed, off-topic share before and after mining."""
    data, mined = out / "data", out / "data" / "mined"
    pool = [line.split()[0] for line in (data / "unlabeled_list.txt").read_text().splitlines() if line.strip()]

    def off_topic(rel: str) -> bool:
        stem = Path(rel).stem
        return not stem.startswith("copy_") and is_off_topic(seed, int(stem) - 1, empty)

    kept = [line.split()[0] for line in (mined / "pool_kept.txt").read_text().splitlines() if line.strip()]
    picked = [line.split()[0] for line in (mined / "mined.txt").read_text().splitlines() if line.strip()]
    picked = [str((mined / p).resolve().relative_to(data.resolve())) for p in picked]
    copies = sum(Path(p).stem.startswith("copy_") for p in pool)
    return dict(pool=len(pool), val_copies=copies, removed_by_dedup=len(pool) - len(kept),
                copies_left_after_dedup=sum(Path(p).stem.startswith("copy_") for p in kept),
                mined_lines=len(picked), mined_unique=len(set(picked)),
                off_topic_in_pool=round(100 * sum(map(off_topic, pool)) / max(len(pool), 1), 1),
                off_topic_in_mined=round(100 * sum(map(off_topic, set(picked))) / max(len(set(picked)), 1), 1))


def run_chain(demo: Demo) -> dict:
    """Every step in order (runner.reached raises Until after the one --until names); the summary."""
    runner, out, seed = demo.runner, demo.out, demo.seed
    demo.data()
    runner.reached("data")
    teacher = demo.ssld("teacher", "demo_teacher", "demo_teacher")
    runner.reached("teacher")
    with_teacher = [f"teacher.models=[{teacher}]"]
    student = demo.ssld("student", "demo", "demo_student", with_teacher)
    runner.reached("student")
    labels_only = demo.ssld("labels_only", "demo_labels_only", "demo_labels_only")
    runner.reached("labels_only")
    demo.mining(teacher)
    runner.reached("mining")
    mined = demo.ssld("mined_student", "demo_mined", "demo_mined_student", with_teacher)
    runner.reached("mined")
    downstream = {"ssld": mined, "labels_only": labels_only, "random_init": RANDOM_INIT}
    transfer = demo.transfer(downstream)
    runner.reached("transfer")
    detection = demo.detection(downstream)
    d = demo.scale["data"]
    classification = {
        "teacher": dict(read_artifact(teacher), labels=d["num_classes"] * d["train_per_class"], images="train"),
        "labels_only": dict(read_artifact(labels_only), labels=d["num_classes"] * d["labeled_per_class"],
                            images="labeled subset"),
        "ssld": dict(read_artifact(student), labels=0, images="labeled subset + raw pool"),
        "ssld_mined": dict(read_artifact(mined), labels=0, images="labeled subset + mined"),
    }
    summary = dict(
        seed=seed, scale=demo.scale_name, classification=classification,
        mining=pool_stats(out, seed, d["unlabeled_empty"]),
        transfer={f"{b}/{m}": dict(backbone=str(downstream[b]), multipliers=list(MULTIPLIERS[m]),
                                   top1=r["finetune"]["score"], top1_test_size=r["finetune"]["score_test_size"],
                                   top1_fix=r["score_fix"]) for (b, m), r in transfer.items()},
        detection={b: dict(backbone=str(downstream[b]), AP=r["AP"], AP50=r["AP50"]) for b, r in detection.items()},
        steps=runner.status,
    )
    summary["gaps"] = gaps(summary)
    return summary


def main(argv=None):
    p = ArgumentParser(prog="python -m distill.demo", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out", help="folder for data, runs, artifacts and the report (e.g. runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and every trainer (default 0)")
    p.add_argument("--force", action="store_true", help="redo every step")
    p.add_argument("--until", choices=STEPS, help="stop after this step")
    p.add_argument("--scale", choices=sorted(SCALES), default="demo", help="tiny: seconds, for tests")
    p.add_argument("--quiet", action="store_true", help="trainer output to OUT/demo.log, only steps on the console")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: $OMP_NUM_THREADS, else one less than the cores: a data "
                        "loader process decodes on the last one)")
    args = p.parse_args(argv)
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = StepRunner(out, force=args.force, quiet=args.quiet, until=args.until, tag="demo", log_name="demo.log")
    start = time.perf_counter()
    try:
        summary = run_chain(Demo(runner, args.seed, args.scale))
    except Until:
        return None
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["chain_seconds"] = runner.seconds()
    write_report(out, summary)
    print(format_tables(summary))
    print(f"\nreport: {out / 'report.md'}, {out / 'report.png'}, {out / 'summary.json'} "
          f"(steps {summary['chain_seconds']:.0f} s, this run {summary['seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    run_cli(main)
