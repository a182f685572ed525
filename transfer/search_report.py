"""The reports of a transfer grid search: OUT/search.csv, OUT/search.md, the validation heatmap
OUT/search.png and summary.json, the --all table (transfer_table.md / .json), and the names they share
with the grid (transfer.search): a config key's short name and a cell's id, which is also its folder.
"""
from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

from distill.core.atomic import atomic_write

# The grid's short names for config keys (`--grid lr=...`); reports, cell ids and plots show them.
ALIASES = {"lr": "optim.lr", "wd": "optim.weight_decay", "weight_decay": "optim.weight_decay",
           "lr_mult": "optim.lr_mult", "epochs": "schedule.epochs", "mixup": "data.mixup",
           "label_smoothing": "loss.label_smoothing", "batch_size": "data.batch_size"}
SHORT = {v: k for k, v in ALIASES.items() if k not in ("weight_decay",)}


def fmt_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(fmt_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cell_id(cell: dict) -> str:
    text = "_".join(f"{SHORT.get(k, k)}={fmt_value(v)}" for k, v in cell.items())
    return re.sub(r"[^A-Za-z0-9_.=+-]", "", text)


# ---------------------------------------------------------------------------------------------------
# A cell's results as a row, and the search's one-line summary

def row_of(name: str, cell: dict, results: dict, metric: str) -> dict:
    row = {"cell": name}
    row.update({SHORT.get(k, k): fmt_value(v) if isinstance(v, list) else v for k, v in cell.items()})
    if "diverged" in results:
        return {**row, "val": None, "val_at_test_size": None, "weight_decay_used": None, "seconds": None,
                "diverged": True}
    row.update(val=round(results["score"], 4), val_at_test_size=round(results["score_test_size"], 4),
               weight_decay_used=results["weight_decay"], seconds=results.get("seconds"))
    return row


def best_row(rows: list[dict]) -> dict:
    """The highest validation score; the first of equals in the grid's order."""
    return max((r for r in rows if r["val"] is not None), key=lambda r: r["val"])


def summary_line(s: dict) -> str:
    text = f"{s['dataset']} / {s['backbone']}: best {s['best_cell']} (val {s['metric']} {s['best_val']:.2f})"
    if "test" in s:
        text += (f"; test {s['test']:.2f} at {s['train_size']} px, {s['test_at_test_size']:.2f} at "
                 f"{s['test_size']} px")
    return text + f"; {s['seconds']:.0f} s"


# ---------------------------------------------------------------------------------------------------
# Files

def write_reports(out: Path, grid: dict, rows: list[dict], metric: str, summary: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
    atomic_write(out / "search.csv", write_csv)
    best = best_row(rows) if any(r["val"] is not None for r in rows) else None
    lines = [f"# Transfer grid search: {summary['dataset']} / {summary['backbone']}" if summary else
             "# Transfer grid search (in progress)", "",
             f"Validation {metric} (model selection), at the train resolution and the test resolution.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        mark = "**" if r is best else ""
        lines.append("| " + " | ".join(f"{mark}{_cell_text(r.get(c))}{mark}" for c in columns) + " |")
    if summary and "test" in summary:
        lines += ["", f"Best cell `{summary['best_cell']}` retrained on train+val: test {metric} "
                      f"**{summary['test']:.2f}** at {summary['train_size']} px, "
                      f"**{summary['test_at_test_size']:.2f}** at {summary['test_size']} px"
                  + (f", {summary['test_fix']:.2f} after Fix" if "test_fix" in summary else "") + "."]
    if summary:
        lines += ["", f"{summary['cells']} cells, {summary['seconds']:.0f} s."]
        atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    atomic_write(out / "search.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    if summary:
        plot_heatmap(out / "search.png", grid, rows, metric)


def _cell_text(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:g}"
    return "" if v is None else str(v)


AXIS_NAMES = {"lr": "learning rate", "wd": "weight decay", "lr_mult": "lr multipliers"}
METRIC_NAMES = {"top1": "top-1 accuracy", "mean_per_class": "mean per-class accuracy"}


def plot_heatmap(path: Path, grid: dict, rows: list[dict], metric: str) -> Path:
    """Validation score over lr (rows) x weight decay (columns); one panel per value of the other axes, one
    colour scale for all panels (with its bar), the selected cell outlined, diverged cells marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize

    keys = list(grid)
    row_key = "optim.lr" if "optim.lr" in keys else keys[0]
    rest = [k for k in keys if k != row_key]
    col_key = "optim.weight_decay" if "optim.weight_decay" in rest else (rest[0] if rest else None)
    panel_keys = [k for k in rest if k != col_key]
    panels = list(itertools.product(*(grid[k] for k in panel_keys))) or [()]
    r_vals, c_vals = grid[row_key], grid[col_key] if col_key else [None]
    scores = {r["cell"]: r["val"] for r in rows}   # None: diverged; absent: not run yet
    best = best_row(rows)["cell"] if any(r["val"] is not None for r in rows) else None

    def cell_at(i, j, panel):
        cell = {row_key: r_vals[i], **({col_key: c_vals[j]} if col_key else {}), **dict(zip(panel_keys, panel))}
        return cell_id({k: cell[k] for k in keys})

    values = [np.array([[scores.get(cell_at(i, j, p)) for j in range(len(c_vals))] for i in range(len(r_vals))],
                       dtype=float) for p in panels]
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    norm = Normalize(lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else Normalize(lo, hi)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.88")
    name = lambda k: AXIS_NAMES.get(SHORT.get(k, k), SHORT.get(k, k))  # noqa: E731
    fig, axes = plt.subplots(1, len(panels), squeeze=False, layout="constrained",
                             figsize=(max(5.5, 1.6 + len(panels) * (1.3 + 0.85 * len(c_vals))),
                                      max(3.2, 1.7 + 0.5 * len(r_vals))))
    for ax, panel, grid_vals in zip(axes[0], panels, values):
        image = ax.imshow(np.ma.masked_invalid(grid_vals), cmap=cmap, norm=norm, aspect="auto")
        ids = [[cell_at(i, j, panel) for j in range(len(c_vals))] for i in range(len(r_vals))]
        _label_cells(ax, grid_vals, ids, scores, best, cmap, norm)
        ax.set_yticks(range(len(r_vals)), [fmt_value(v) for v in r_vals], fontsize=9)
        ax.set_xticks(range(len(c_vals)), [fmt_value(v) if v is not None else "" for v in c_vals], fontsize=9)
        ax.set_ylabel(name(row_key), fontsize=10)
        ax.set_xlabel(name(col_key) if col_key else "", fontsize=10)
        if panel_keys:
            ax.set_title(", ".join(f"{SHORT.get(k, k)} = {fmt_value(v)}" for k, v in zip(panel_keys, panel)),
                         fontsize=10)
    label = f"validation {METRIC_NAMES.get(metric, metric)} (%)"
    fig.colorbar(image, ax=axes[0].tolist(), label=label, shrink=0.9, pad=0.02)
    fig.suptitle(label + ("\nred box: the selected cell" if best else ""), fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _label_cells(ax, values, ids, scores: dict, best: str | None, cmap, norm) -> None:
    """A panel's scores in ink legible on their fill, 'diverged' where a cell diverged, a red box on the best."""
    import numpy as np
    from matplotlib.patches import Rectangle

    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            r, g, b, _ = cmap(norm(v))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color=ink, fontsize=9)
        elif ids[i][j] in scores:
            ax.text(j, i, "diverged", ha="center", va="center", color="0.3", fontsize=7)
        if ids[i][j] == best:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2.5))


def write_table(out: Path, table: list[dict], backbones: dict) -> None:
    lines = ["# Transfer results (test, Kornblith et al. protocol)", "",
             f"baseline: `{backbones['baseline']}`, distilled: `{backbones['distilled']}`. "
             "Mean per-class accuracy for Aircraft, Pets, Caltech101, Flowers; top-1 elsewhere.", "",
             "| dataset | metric | baseline | distilled | gain |", "|---|---|---|---|---|"]
    for r in table:
        b, d = r.get("baseline"), r.get("distilled")
        show = (lambda v: "n/a" if v is None else f"{v:.2f}")
        gain = f"{d - b:+.2f}" if b is not None and d is not None else ""
        lines.append(f"| {r['dataset']} | {r.get('metric', '')} | {show(b)} | {show(d)} | {gain} |")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "transfer_table.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    atomic_write(out / "transfer_table.json", lambda tmp: Path(tmp).write_text(json.dumps(table, indent=2)))
    print("\n".join(lines), flush=True)
