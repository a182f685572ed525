"""Run metrics: one CSV row per log call (columns grow as new keys appear), TensorBoard alongside, PNG curves."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from .atomic import ensure_writable


class RunLog:
    """Append scalars to OUT/metrics.csv and OUT/tb (TensorBoard, when installed). Disabled on non-main ranks.

    A resumed run passes `resume_step`: rows up to it are kept, later ones (logged after the last
    checkpoint, before the interruption) are dropped and logged again.
    """

    def __init__(self, out_dir, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        ensure_writable(self.path.parent)   # a run folder that became read-only: one line, before any thread
        self.rows = []
        if resume_step is not None and self.path.is_file():
            self.rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(ensure_writable(self.path.parent / "tb")))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def log(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self.rows.append(row)
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(csv_path) -> list[dict]:
    with open(csv_path, newline="") as f:
        rows = [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
                for row in csv.DictReader(f)]
    for row in rows:
        row["step"] = int(row["step"])
    return rows


# Panels by unit, in this order: (panel title, y-axis label, test on the key). A key matching none gets a
# panel of its own, after these.
PANELS = (
    ("loss", "loss", lambda k: "loss" in k),
    ("accuracy", "accuracy (%)", lambda k: any(t in k for t in ("top", "acc", "mean_per_class"))),
    ("box AP", "AP (%)", lambda k: k.startswith("AP")),
    ("learning rate", "learning rate", lambda k: k == "lr" or k.startswith("lr_")),
    ("throughput", "images / s", lambda k: k in ("img_per_s", "images_per_s")),
    ("skipped images", "images", lambda k: k.startswith("skipped") or k == "corrupt"),
)
X_AXES = ("epoch",)   # logged to map steps to epochs: drawn as the top axis, not as a curve


def _panel_of(key: str) -> str | None:
    return next((title for title, _, match in PANELS if match(key)), None)


def group_by_unit(keys) -> dict[str, tuple[str, list[str]]]:
    """{panel title: (y label, keys)}: one unit per panel, so no curve is read against another's scale."""
    found: dict[str, tuple[str, list[str]]] = {}
    for k in keys:
        if k in X_AXES:
            continue
        title, unit = next(((t, u) for t, u, match in PANELS if match(k)), (k, k))
        found.setdefault(title, (unit, []))[1].append(k)
    order = [t for t, _, _ in PANELS]
    return dict(sorted(found.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def plot_metrics(csv_path, png_path, keys=None) -> Path:
    """One panel per unit (loss, %, lr, img/s, skipped images), x = step, epochs on the top axis when logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(csv_path)
    series = {}
    for k in keys or [k for k in dict.fromkeys(k for r in rows for k in r) if k != "step"]:
        pts = [(r["step"], r[k]) for r in rows if k in r and not math.isnan(r[k])]
        if not pts or (_panel_of(k) == "skipped images" and not any(v for _, v in pts)):
            continue   # none skipped: no panel
        if _panel_of(k) is None and k not in X_AXES and len({v for _, v in pts}) == 1:
            continue   # a constant of unknown meaning (e.g. the eval set's size) is no curve
        series[k] = pts
    panels = group_by_unit(series) or {"no metrics logged": ("", [])}
    cols = 2 if len(panels) == 4 else min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.4 * cols, 3.7 * nrows), squeeze=False)
    to_epoch = _step_to_epoch(series.get("epoch"), np)
    for ax, (title, (unit, names)) in zip(axes.flat, panels.items()):
        for k in names:
            steps, values = zip(*series[k])
            marker = dict(marker="o", ms=3) if len(steps) < 30 else {}
            if unit == "images":
                ax.step(steps, values, where="post", label=k, **marker)
            else:   # the total loss drawn over its parts
                ax.plot(steps, values, label=k, lw=2.2 if k == "loss" and len(names) > 1 else 1.4, **marker)
        values = [v for k in names for _, v in series[k]]
        if unit == "loss" and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")   # parts 100x below the total stay apart
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step" + ("   (epoch on top)" if to_epoch else ""), fontsize=10)
        ax.set_ylabel(unit, fontsize=10)
        ax.tick_params(labelsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))   # steps are counted
        steps = [s for k in names for s, _ in series[k]]
        if max(steps) - min(steps) < 2:
            ax.set_xlim(min(steps) - 1, max(steps) + 1)
        ax.grid(alpha=0.3)
        if unit in ("images / s", "images"):
            ax.set_ylim(bottom=0)
        if unit == "images":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if len(names) > 5:   # below the panel: inside, a long legend hides the curves
            ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        elif len(names) > 1:
            ax.legend(fontsize=8, framealpha=0.85)
        elif names and names[0].replace("_", " ") != title:
            ax.set_title(f"{title}  ({names[0]})", fontsize=11)
        if to_epoch is not None:
            top = ax.secondary_xaxis("top", functions=to_epoch)
            top.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are counted, not measured
            top.tick_params(labelsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(Path(csv_path).resolve().parent.name, fontsize=10, color="0.35")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _step_to_epoch(points, np):
    """(step -> epoch, epoch -> step), a line fitted to the logged epochs."""
    if not points or len({s for s, _ in points}) < 2 or max(e for _, e in points) < 2:
        return None   # under two epochs an epoch axis says nothing the step axis does not
    slope, offset = np.polyfit(*np.asarray(points, dtype=float).T, 1)
    if slope <= 0:
        return None
    return (lambda s: np.asarray(s) * slope + offset), (lambda e: (np.asarray(e) - offset) / slope)
