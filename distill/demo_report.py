"""The demo's report: the three tables (terminal and markdown), the gaps and one picture, from summary.json.

Split out of distill/demo.py: the demo runs the steps, this module only formats what they wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

from distill.core.atomic import atomic_write
from distill.students.zoo import RESNET_TRANSFER

# Transfer multipliers: the reduced list SSLD recommends for its distilled ResNets, and uniform.
MULTIPLIERS = {"reduced": RESNET_TRANSFER, "uniform": (1.0,) * 5}
CLASSIFICATION_ROWS = (("teacher", "teacher, all train labels"), ("labels_only", "student, labeled subset only"),
                       ("ssld", "SSLD student, labeled + raw pool"), ("ssld_mined", "SSLD student, labeled + mined"))
BACKBONES = (("ssld", "SSLD student (mined)"), ("labels_only", "labels-only student"), ("random_init", "random init"))


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

