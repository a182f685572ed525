"""The whole SSLD story on generated data, in one command: python -m distill.demo OUT [--seed N] [--force].

    data         OUT/data, OUT/downstream    8 shape classes (the teacher's labels, a 40-per-class labeled
                                             subset, a pool half off-topic with copies of val images) and
                                             a downstream task of 4 new shapes with 10 labels each
    teacher      OUT/teacher                 from every train label             (configs/demo_teacher.yaml)
    student      OUT/student                 SSLD: labeled subset + raw pool, no labels   (configs/demo.yaml)
    labels_only  OUT/labels_only             the same student from the labeled subset (demo_labels_only.yaml)
    mining       OUT/data/mined              dedup the pool against val, the teacher's top-k per class
    mined        OUT/mined_student           SSLD on labeled subset + mined list       (configs/demo_mined.yaml)
    transfer     OUT/transfer/*              SSLD student, labels-only student, random init on the downstream
                                             task, reduced and uniform multipliers, then Fix
                                                                             (configs/transfer/demo.yaml)
    detection    OUT/detection/*             Faster R-CNN on each as the backbone (configs/detection/demo.yaml)
    report       OUT/summary.json, OUT/report.md, OUT/report.png

Every student gets the same number of training steps (data.epoch_samples), so a gap is the data and the
teacher, not a longer run. A step whose output exists is skipped (an interrupted demo continues; each
trainer also resumes its own checkpoint); --force redoes every step, --until STEP stops after STEP.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

from distill.core.atomic import atomic_write
from distill.core.errors import ArgumentParser, UserError, run_cli
from distill.core.demo_data import PRESETS, generate, is_off_topic
from distill.students.zoo import RESNET_TRANSFER

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = ("data", "teacher", "student", "labels_only", "mining", "mined", "transfer", "detection", "report")
# Transfer multipliers: the reduced list SSLD recommends for its distilled ResNets, and uniform.
MULTIPLIERS = {"reduced": RESNET_TRANSFER, "uniform": (1.0,) * 5}
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


def config(name: str) -> Path:
    path = CONFIGS / name
    if not path.is_file():
        raise UserError(f"demo config {path} not found: run the demo from a checkout of ssld-kit")
    return path


def _o(overrides) -> list[str]:
    return [a for o in overrides for a in ("-o", o)]


class Chain:
    """Runs the steps in order; a step whose outputs exist is skipped unless --force."""

    def __init__(self, out: Path, seed: int, scale: str, force: bool, quiet: bool):
        self.out, self.seed, self.scale, self.force, self.quiet = out, seed, SCALES[scale], force, quiet
        self.status: dict[str, dict] = {}
        try:
            self.previous = json.loads((out / "summary.json").read_text()).get("steps", {})
        except (OSError, ValueError):
            self.previous = {}

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def step(self, name: str, outputs: list[Path], run, folders=()):
        """Run `run()` unless every output exists; --force first removes `folders` (the step's own)."""
        done = all(p.exists() for p in outputs)
        if done and not self.force:
            # the time it took when it ran (an earlier summary.json), so the report keeps the chain's cost
            self.status[name] = dict(status="skipped", seconds=self.previous.get(name, {}).get("seconds", 0.0))
            self.say(f"[demo] {name}: done before, skipped ({outputs[0]})")
            return
        if self.force:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
        self.say(f"[demo] {name} ...")
        start = time.perf_counter()
        with self.silenced():
            run()
        missing = [p for p in outputs if not p.exists()]
        if missing:
            raise UserError(f"demo step {name} finished without writing {missing[0]}")
        seconds = time.perf_counter() - start
        self.status[name] = dict(status="ran", seconds=round(seconds, 1))
        self.say(f"[demo] {name}: {seconds:.0f} s")

    @contextlib.contextmanager
    def silenced(self):
        """--quiet: the trainers' own console output goes to OUT/demo.log instead."""
        if not self.quiet:
            yield
            return
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield
        finally:
            with open(self.out / "demo.log", "a") as log:
                log.write(buffer.getvalue())

    # ---------------------------------------------------------------------------------------------
    def data(self):
        for name, folder in (("data", self.out / "data"), ("downstream", self.out / "downstream")):
            self.step(f"data:{name}", [folder / "demo_data.json"],
                      lambda f=folder, n=name: generate(f, overwrite=True, **{**self.scale[n], "seed": self.seed}),
                      folders=[folder])

    def ssld(self, name: str, cfg: str, export: str, extra=()) -> Path:
        folder = self.out / name
        artifact = folder / f"{export}.safetensors"
        from distill import ssld
        overrides = [f"data.root={self.out / 'data'}", f"run.seed={self.seed}", "run.progress=false",
                     *extra, *self.scale["ssld"]]
        self.step(name, [artifact], lambda: ssld.main(["-c", str(config(cfg)), "--out-dir", str(folder),
                                                      *_o(overrides)]), folders=[folder])
        return artifact

    def mining(self, teacher: Path) -> Path:
        data, mined = self.out / "data", self.out / "data" / "mined"
        merged = mined / "ssld_train_list.txt"

        def run():
            from distill.mine import dedup, mining
            common = ["--teacher", str(teacher), "--workers", "0", "--device", "cpu"]
            dedup.main([*common, "--pool", str(data / "unlabeled_list.txt"), "--against", str(data / "val"),
                        "-o", str(mined / "pool_kept.txt"), *DEDUP])
            mining.main([*common, "--pool", str(mined / "pool_kept.txt"), "--k", str(self.mine_k()),
                         "-o", str(mined / "mined.txt"), "--class-names", str(data / "classes.txt"),
                         "--merge-with", str(data / "labeled_list.txt"), "--merged", str(merged),
                         "--no-progress", "--fresh"])
        self.step("mining", [merged], run, folders=[mined])
        return merged

    def mine_k(self) -> int:
        d = self.scale["data"]
        on_topic = d["unlabeled"] * (1 - d["unlabeled_empty"]) / d["num_classes"]
        return max(1, min(MINE_K, int(on_topic * 0.65)))

    def transfer(self, backbones: dict) -> dict:
        from transfer import finetune
        results = {}
        for label, backbone in backbones.items():
            for mult, values in MULTIPLIERS.items():
                folder = self.out / "transfer" / f"{label}_{mult}"
                argv = ["-c", str(config("transfer/demo.yaml")), "--dataset", f"folder:{self.out / 'downstream'}",
                        "--backbone", str(backbone), "--out-dir", str(folder), "--seed", str(self.seed),
                        "--lr-mult", ",".join(f"{v:g}" for v in values), "--fix", "--no-progress",
                        *self.scale["transfer"]]
                self.step(f"transfer:{label}:{mult}", [folder / "results.json"],
                          lambda a=argv: finetune.main(a), folders=[folder])
                results[(label, mult)] = json.loads((folder / "results.json").read_text())
        return results

    def detection(self, backbones: dict) -> dict:
        from detection import train
        data, results = self.out / "data", {}
        for label, backbone in backbones.items():
            folder = self.out / "detection" / label
            overrides = [f"data.train_json={data / 'annotations' / 'instances_train_main.json'}", f"data.train_images={data}",
                         f"data.val_json={data / 'annotations' / 'instances_val_main.json'}", f"data.val_images={data}",
                         f"run.seed={self.seed}", "run.progress=false", *self.scale["detection"]]
            argv = ["-c", str(config("detection/demo.yaml")), "--backbone", str(backbone), "--out-dir", str(folder),
                    *_o(overrides)]
            self.step(f"detection:{label}", [folder / "metrics.json"], lambda a=argv: train.main(a),
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
    chain = Chain(out, args.seed, args.scale, args.force, args.quiet)
    start = time.perf_counter()
    summary = run_chain(chain, args.until)
    if summary is not None:
        summary["seconds"] = round(time.perf_counter() - start, 1)
        summary["chain_seconds"] = round(sum(v["seconds"] for v in summary["steps"].values()), 1)
        write_report(out, summary)
        print(format_tables(summary))
        print(f"\nreport: {out / 'report.md'}, {out / 'report.png'}, {out / 'summary.json'} "
              f"(steps {summary['chain_seconds']:.0f} s, this run {summary['seconds']:.0f} s)")
    return summary


def set_threads(threads: int | None) -> None:
    """Small models on few cores: more compute threads than free cores only make them wait on each other."""
    import torch
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)


def run_chain(chain: Chain, until: str | None):
    out, seed = chain.out, chain.seed

    def stop(step):
        return until == step

    chain.data()
    if stop("data"):
        return None
    teacher = chain.ssld("teacher", "demo_teacher.yaml", "demo_teacher")
    if stop("teacher"):
        return None
    with_teacher = [f"teacher.models=[{teacher}]"]
    student = chain.ssld("student", "demo.yaml", "demo_student", with_teacher)
    if stop("student"):
        return None
    labels_only = chain.ssld("labels_only", "demo_labels_only.yaml", "demo_labels_only")
    if stop("labels_only"):
        return None
    chain.mining(teacher)
    if stop("mining"):
        return None
    mined = chain.ssld("mined_student", "demo_mined.yaml", "demo_mined_student", with_teacher)
    if stop("mined"):
        return None
    downstream = {"ssld": mined, "labels_only": labels_only, "random_init": RANDOM_INIT}
    transfer = chain.transfer(downstream)
    if stop("transfer"):
        return None
    detection = chain.detection(downstream)
    d = chain.scale["data"]
    classification = {
        "teacher": dict(read_artifact(teacher), labels=d["num_classes"] * d["train_per_class"], images="train"),
        "labels_only": dict(read_artifact(labels_only), labels=d["num_classes"] * d["labeled_per_class"],
                            images="labeled subset"),
        "ssld": dict(read_artifact(student), labels=0, images="labeled subset + raw pool"),
        "ssld_mined": dict(read_artifact(mined), labels=0, images="labeled subset + mined"),
    }
    summary = dict(
        seed=seed, scale=[k for k, v in SCALES.items() if v is chain.scale][0],
        classification=classification,
        mining=pool_stats(out, seed, d["unlabeled_empty"]),
        transfer={f"{b}/{m}": dict(backbone=str(downstream[b]), multipliers=list(MULTIPLIERS[m]),
                                   top1=r["finetune"]["score"], top1_test_size=r["finetune"]["score_test_size"],
                                   top1_fix=r["score_fix"]) for (b, m), r in transfer.items()},
        detection={b: dict(backbone=str(downstream[b]), AP=r["AP"], AP50=r["AP50"]) for b, r in detection.items()},
        steps=chain.status,
    )
    summary["gaps"] = gaps(summary)
    return summary


def gaps(s: dict) -> dict:
    """The chain's claims as differences in points; each should be > 0 but the last transfer one, where
    reduced multipliers should hurt a random init. Transfer compares the fine-tuned top-1 (train size)."""
    c, t, d = s["classification"], s["transfer"], s["detection"]

    def best(b):
        return max(t[f"{b}/{m}"]["top1"] for m in MULTIPLIERS)

    return {
        "ssld - labels_only (top-1)": c["ssld"]["top1"] - c["labels_only"]["top1"],
        "mined - unmined ssld (top-1)": c["ssld_mined"]["top1"] - c["ssld"]["top1"],
        "transfer: ssld - labels_only (reduced mult.)": t["ssld/reduced"]["top1"] - t["labels_only/reduced"]["top1"],
        "transfer: ssld - random init (each its best mult.)": best("ssld") - best("random_init"),
        "transfer: reduced - uniform, ssld": t["ssld/reduced"]["top1"] - t["ssld/uniform"]["top1"],
        "transfer: reduced - uniform, random init": t["random_init/reduced"]["top1"] - t["random_init/uniform"]["top1"],
        "detection: ssld - labels_only (AP)": d["ssld"]["AP"] - d["labels_only"]["AP"],
        "detection: ssld - random init (AP)": d["ssld"]["AP"] - d["random_init"]["AP"],
    }


# -------------------------------------------------------------------------------------------------
# Report: the three tables (terminal and markdown) and one picture.

CLASSIFICATION_ROWS = (("teacher", "teacher, all train labels"), ("labels_only", "student, labeled subset only"),
                       ("ssld", "SSLD student, labeled + raw pool"), ("ssld_mined", "SSLD student, labeled + mined"))
BACKBONES = (("ssld", "SSLD student (mined)"), ("labels_only", "labels-only student"), ("random_init", "random init"))


def tables(s: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    m = s["mining"]
    cls = [[title, s["classification"][k]["arch"], str(s["classification"][k]["labels"]),
            f"{s['classification'][k]['top1']:.2f}", f"{s['classification'][k]['top1_test_res']:.2f}"]
           for k, title in CLASSIFICATION_ROWS]
    transfer = [[title, mult, f"{r['top1']:.2f}", f"{r['top1_test_size']:.2f}", f"{r['top1_fix']:.2f}"]
                for b, title in BACKBONES for mult in MULTIPLIERS for r in [s["transfer"][f"{b}/{mult}"]]]
    det = [[title, f"{s['detection'][b]['AP']:.1f}", f"{s['detection'][b]['AP50']:.1f}"] for b, title in BACKBONES]
    return [
        (f"Classification (8 shapes, val top-1 %). Mining: pool {m['pool']} images ({m['off_topic_in_pool']:.0f}% "
         f"off-topic, {m['val_copies']} val copies); dedup removed {m['removed_by_dedup']} "
         f"({m['copies_left_after_dedup']} copies left); mined {m['mined_unique']} images, "
         f"{m['off_topic_in_mined']:.0f}% off-topic",
         ["model", "arch", "labels used", "top-1", "top-1 test res"], cls),
        ("Transfer (4 new shapes, 10 labels each; top-1 %)",
         ["backbone", "multipliers", "fine-tuned", "at test res", "after Fix"], transfer),
        ("Detection (Faster R-CNN FPN, the main shape of each image, 8 classes; COCO box AP %)", ["backbone", "AP", "AP50"], det),
    ]


NOTE = ("At 32 px the students' last stage is a 1x1 map; at the 36 px test size it becomes 2x2, so the "
        "test-size and Fix numbers fall: FixRes gains need larger images than this budget allows.")


def format_tables(s: dict) -> str:
    text = []
    for title, header, rows in tables(s):
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        text.append(f"\n{title}")
        for row in [header, *rows]:
            text.append("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                         for i, (c, w) in enumerate(zip(row, widths))))
    text.append("\n" + NOTE)
    text.append("\nGaps (points; each should be > 0 except reduced - uniform for a random init):")
    text += [f"  {k:<52} {v:+6.2f}" for k, v in s["gaps"].items()]
    return "\n".join(text)


def format_markdown(s: dict) -> str:
    text = [f"# SSLD demo report (seed {s['seed']}; the steps took {s['chain_seconds']:.0f} s, this run "
            f"{s['seconds']:.0f} s)", ""]
    for title, header, rows in tables(s):
        text += [f"**{title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        text += ["| " + " | ".join(row) + " |" for row in rows]
        text.append("")
    text += [NOTE, "", "**Gaps** (points)", "", "| claim | gap |", "|---|---:|"]
    text += [f"| {k} | {v:+.2f} |" for k, v in s["gaps"].items()]
    text += ["", "Steps: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)" for k, v in s["steps"].items()), ""]
    return "\n".join(text)


def plot_report(s: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), gridspec_kw=dict(width_ratios=[1.0, 1.5, 1.0]))
    colours = {"teacher": "#7f7f7f", "labels_only": "#4c72b0", "ssld": "#dd8452", "ssld_mined": "#c44e52",
               "random_init": "#bbbbbb"}

    def bars(ax, xs, values, colour, label, width, offset):
        b = ax.bar([x + offset for x in xs], values, width, color=colour, label=label, edgecolor="black", lw=0.5)
        ax.bar_label(b, fmt="%.1f", padding=2, fontsize=8)

    ax = axes[0]
    c = s["classification"]
    for i, (key, title) in enumerate(CLASSIFICATION_ROWS):
        bars(ax, [0, 1], [c[key]["top1"], c[key]["top1_test_res"]], colours[key], title, 0.2, (i - 1.5) * 0.2)
    ax.set_xticks([0, 1], ["top-1", "top-1 at test res"])
    ax.set_title("Classification: 8 shapes (val top-1 %)")
    ax = axes[1]
    groups = [(mult, stage) for mult in MULTIPLIERS for stage in ("top1", "top1_fix")]
    for i, (b, title) in enumerate(BACKBONES):
        bars(ax, range(len(groups)), [s["transfer"][f"{b}/{m}"][k] for m, k in groups],
             colours[b if b != "ssld" else "ssld_mined"], title, 0.26, (i - 1) * 0.26)
    ax.set_xticks(range(len(groups)), [f"{m} mult.\n{'fine-tuned' if k == 'top1' else 'after Fix'}"
                                       for m, k in groups])
    ax.set_title("Transfer: 4 new shapes, 10 labels each (top-1 %)")
    ax = axes[2]
    for i, (b, title) in enumerate(BACKBONES):
        bars(ax, [0, 1], [s["detection"][b]["AP"], s["detection"][b]["AP50"]],
             colours[b if b != "ssld" else "ssld_mined"], title, 0.26, (i - 1) * 0.26)
    ax.set_xticks([0, 1], ["box AP", "box AP50"])
    ax.set_title("Detection: Faster R-CNN FPN (%)")
    for ax in axes:
        top = max(r.get_height() for r in ax.patches)
        ax.set_ylim(0, max(10.0, top * 1.18))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"SSLD demo, seed {s['seed']}: distilled student vs labels-only, mined vs raw pool, downstream",
                 fontsize=12)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict) -> None:
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(format_markdown(summary)))
    plot_report(summary, out / "report.png")


if __name__ == "__main__":
    run_cli(main)
