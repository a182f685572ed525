"""The whole SSLD pipeline on generated demo data, on a CPU: python -m distill.demo OUT.

    1. generate demo data        OUT/data       (python -m distill.demo_data, with an unlabeled pool)
    2. train the demo teacher    OUT/teacher    (configs/demo_teacher.yaml: labels, loss ce)
    3. distill the demo student  OUT/student    (configs/demo.yaml: ssld loss, labeled + unlabeled, no labels)
    4. the labels-only baseline  OUT/labels_only (configs/demo_labels_only.yaml; --no-baseline skips it)

The student artifact is OUT/student/demo_student.safetensors. A finished step is not run again (its
artifact exists), so an interrupted demo continues where it stopped; --force redoes everything.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill import ssld
from distill.students.artifact import read_meta
from distill.demo_data import generate
from distill.core.errors import UserError, run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# A from-scratch CNN needs a few hundred images per class to learn shape rather than memorise (measured:
# 60/class stays near chance on val, 300/class at 64 px reaches ~45% in 10 epochs).
DATA = dict(num_classes=8, train_per_class=250, val_per_class=50, image_size=64, seed=0, unlabeled=2000)


def config_path(name: str) -> Path:
    path = CONFIGS / name
    if not path.is_file():
        raise UserError(f"demo config {path} not found: run the demo from a checkout of ssld-kit")
    return path


def train_step(config: str, out: Path, name: str, overrides, force: bool) -> dict:
    """Run one trainer config into OUT/<name>; returns the artifact's metadata."""
    artifact = out / name / f"{read_export_name(config)}.safetensors"
    if force or not artifact.is_file():
        resume = ["--resume"] if (out / name / "checkpoint.pt").is_file() and not force else []
        overrides = [f"data.root={out / 'data'}", f"out_dir={out / name}", *overrides]
        ssld.main(["-c", str(config_path(config)), *(a for o in overrides for a in ("-o", o)), *resume])
    return read_meta(artifact) | {"path": str(artifact)}


def read_export_name(config: str) -> str:
    from distill.core.config import load_yaml_with_bases
    return load_yaml_with_bases(config_path(config))["export"]["name"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill.demo", description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for data, runs and artifacts (e.g. runs/demo)")
    p.add_argument("--no-baseline", action="store_true", help="skip the labels-only student")
    p.add_argument("--force", action="store_true", help="redo every step")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every training step, e.g. -o epochs=4")
    for key, value in DATA.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value, help=f"demo data (default {value})")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.force or not (out / "data" / "unlabeled_list.txt").is_file():
        generate(out / "data", overwrite=True, **{k: getattr(args, k) for k in DATA})
    teacher = train_step("demo_teacher.yaml", out, "teacher", args.override, args.force)
    student = train_step("demo.yaml", out, "student",
                         [f"teacher.models=[{teacher['path']}]", *args.override], args.force)
    rows = [("teacher (labels)", teacher), ("student (ssld, no labels)", student)]
    if not args.no_baseline:
        rows.append(("student (labels only)", train_step("demo_labels_only.yaml", out, "labels_only",
                                                         args.override, args.force)))
    summary = {name: dict(arch=m["arch"], top1=m["pretrain"]["top1"], top1_test_res=m["pretrain"]["top1_test_res"],
                          epochs=m["pretrain"]["epochs"], artifact=m["path"]) for name, m in rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{'model':<27} {'arch':<14} {'top-1':>6} {'top-1 test res':>15}")
    for name, s in summary.items():
        print(f"{name:<27} {s['arch']:<14} {s['top1']:>6.2f} {s['top1_test_res']:>15.2f}")
    print(f"\nstudent artifact: {student['path']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
