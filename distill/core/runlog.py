"""Run metrics: one CSV row per log call (columns grow as new keys appear), TensorBoard alongside, PNG curves."""
from __future__ import annotations

import csv
import math
from pathlib import Path


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = []
        if resume_step is not None and self.path.is_file():
            self.rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.path.parent / "tb"))
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


def plot_metrics(csv_path, png_path, keys=None) -> Path:
    """One panel per metric family (loss / accuracy / lr), x = step. Returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    keys = keys or [k for k in dict.fromkeys(k for r in rows for k in r) if k != "step"]
    keys = [k for k in keys if any(k in r and not math.isnan(r[k]) for r in rows)]
    panels = {}
    for k in keys:
        family = "loss" if "loss" in k else "lr" if k == "lr" or k.startswith("lr") else \
            "accuracy / AP" if any(t in k for t in ("top", "acc", "ap", "AP", "mean_per_class")) else "other"
        panels.setdefault(family, []).append(k)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (family, names) in zip(axes[0], panels.items()):
        for k in names:
            pts = [(r["step"], r[k]) for r in rows if k in r and not math.isnan(r[k])]
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k)
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
