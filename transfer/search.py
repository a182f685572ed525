"""Grid search for transfer fine-tuning: fit each cell on train, select on val, retrain the best on
train+val and report test (Kornblith et al. protocol).

    python -m transfer.search --dataset flowers102 --backbone r50_vd_ssld \\
        --grid lr=0.01,0.003 wd=1e-4,1e-5 lr_mult=1,1,1,1,1:0.1,0.1,0.2,0.2,0.3
    python -m transfer.search --all --baseline timm:resnet50d --pretrained --distilled r50_vd_ssld

Grid axes are `key=v1,v2,...` (lr, wd, lr_mult, epochs, mixup, label_smoothing, or any config key such
as optim.momentum); lr_mult lists are separated by ':'. Without --grid the grid of
configs/transfer/search.yaml is used. Cells run one after another, or spread over the GPUs present (one
cell per GPU at a time). Every cell is a transfer.finetune run folder under OUT/cells/: a finished cell
is skipped on restart and an interrupted one resumes from its checkpoint. Reports (transfer.search_report):
OUT/search.csv, OUT/search.md and OUT/search.png (validation heatmap); the final run is OUT/final/<cell>/.
--all runs the ten datasets for two backbones and writes OUT/transfer_table.md (dataset, baseline,
distilled), the PaddleClas-style table.

Exit status: 0 when every search (every --all row) finished; 2 with a one-line reason when a search's cells
all diverged, when nothing of an --all sweep ran (e.g. no dataset on this machine), or when some of it
failed; the reports of what did run are written either way.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

import yaml

from distill.students.artifact import load_student
from distill.core.atomic import atomic_write
from distill.core.config import Config, read_yaml
from distill.core.errors import ArgumentParser, UserError, number_in, run_cli
from distill.core.recipes import resolve_recipe
from distill.students.stages import parse_multipliers

from . import config as tcfg
from . import finetune as ft
from .datasets import TEN, load_dataset
from .search_report import ALIASES, SHORT, best_row, cell_id, row_of, summary_line, write_reports, \
    write_table

SEARCH_CONFIG = resolve_recipe("transfer/search")
PLAIN_MULT = [1.0] * 5


# ---------------------------------------------------------------------------------------------------
# The grid

def parse_grid(items) -> dict[str, list]:
    """['lr=0.01,0.003', 'lr_mult=1,1,1,1,1:0.1,...'] -> {'optim.lr': [0.01, 0.003], 'optim.lr_mult': [...]}"""
    schema = tcfg.DEFAULTS
    grid = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"grid axis {item!r} must look like key=v1,v2 (e.g. lr=0.01,0.003)")
        name, raw = item.split("=", 1)
        key = ALIASES.get(name.strip(), name.strip())
        section, _, leaf = key.rpartition(".")
        if (schema.get(section, {}) if section else schema).get(leaf, "missing") == "missing":
            raise UserError(f"grid axis {name!r} is not a config key; use {', '.join(ALIASES)} or a key "
                            "of transfer.finetune's schema such as optim.momentum")
        if key == "optim.lr_mult":
            values = [parse_multipliers(v) for v in raw.split(":") if v.strip()]
        else:
            values = [parse_value(v) for v in raw.split(",") if v.strip()]
        if not values:
            raise UserError(f"grid axis {name!r} has no values")
        grid[key] = values
    return grid


def parse_value(text: str):
    """A number when it reads as one (YAML would keep '1e-4' a string), else YAML (true, null, words)."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def default_grid(meta: dict) -> dict[str, list]:
    """configs/transfer/search.yaml; plus [recommended, plain] multipliers for a distilled backbone."""
    grid = {ALIASES.get(k, k): list(v) for k, v in read_yaml(SEARCH_CONFIG).items()}
    return add_multiplier_axis(grid, meta)


def add_multiplier_axis(grid: dict, meta: dict) -> dict:
    recommended = [float(m) for m in (meta.get("recommended", {}).get("transfer") or PLAIN_MULT)]
    if "optim.lr_mult" not in grid and recommended != PLAIN_MULT:
        grid = {**grid, "optim.lr_mult": [recommended, PLAIN_MULT]}
    return grid


def cells_of(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_config(base: Config, cell: dict, out: Path, split: str, parallel: bool) -> Config:
    cfg = copy.deepcopy(base.to_dict())
    cfg["run"]["out_dir"] = str(out)
    cfg["data"]["split"] = split
    if split == "select":
        cfg["fix"]["enabled"] = False  # selection compares fine-tuning; Fix runs on the final model only
    if parallel:
        cfg["run"]["progress"] = False
        cfg["run"]["device"] = "cuda"
    for key, value in cell.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return Config.wrap(cfg)


def read_done(out: Path) -> dict | None:
    path = out / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if "finetune" in results or "diverged" in results else None


def run_or_record_divergence(cfg: Config, data=None) -> dict:
    """A diverging cell is a result of the search (a too-high lr), not a reason to stop it."""
    try:
        return ft.fine_tune(cfg, data=data)
    except ft.Diverged as e:
        print(f"cell diverged: {e}", flush=True)
        results = {"diverged": str(e)}
        out = Path(cfg.run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
        return results


# ---------------------------------------------------------------------------------------------------
# Running cells: in this process, or one worker process per GPU

def _pin_gpu(queue) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


def _run_cell_in_worker(cfg_dict: dict) -> dict:
    return run_or_record_divergence(Config.wrap(cfg_dict))


def run_cells(jobs: list[tuple[str, Config]], gpus: int, data, on_done) -> None:
    """jobs: (cell id, config). `on_done(cell id, results)` is called in the parent as each finishes."""
    if gpus <= 1:
        for name, cfg in jobs:
            print(f"\n== cell {name}", flush=True)
            on_done(name, run_or_record_divergence(cfg, data))
        return
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for g in range(gpus):
        queue.put(g)
    from concurrent.futures import ProcessPoolExecutor, as_completed
    with ProcessPoolExecutor(gpus, mp_context=ctx, initializer=_pin_gpu, initargs=(queue,)) as pool:
        futures = {pool.submit(_run_cell_in_worker, cfg.to_dict()): name for name, cfg in jobs}
        for future in as_completed(futures):
            on_done(futures[future], future.result())


def gpu_count(requested: int | None) -> int:
    import torch
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is None:
        return present
    if requested > present:
        raise UserError(f"--gpus {requested}, but {present} GPU(s) are present")
    return requested


# ---------------------------------------------------------------------------------------------------
# One search

def search(base: Config, grid: dict | None, out: Path, gpus: int = 0, final: bool = True) -> dict:
    """Run (or resume) the grid for base.dataset / base.backbone; returns the summary (also written)."""
    t0 = time.perf_counter()
    data = load_dataset(base.dataset, base.data.root, base.data.download, base.data.val_fraction,
                        base.data.split_seed)
    meta = load_student(base.backbone, num_classes=data.num_classes, pretrained=base.pretrained)[1]
    grid = add_multiplier_axis(grid, meta) if grid else default_grid(meta)
    cells = cells_of(grid)
    print(f"search {base.dataset} / {base.backbone}: {len(cells)} cells over "
          + ", ".join(f"{SHORT.get(k, k)} ({len(v)})" for k, v in grid.items())
          + f"; select on val ({data.metric}), then retrain on train+val and report test", flush=True)

    rows: dict[str, dict] = {}
    todo = []
    for cell in cells:
        name = cell_id(cell)
        done = read_done(out / "cells" / name)
        if done is not None:
            rows[name] = row_of(name, cell, done, data.metric)
        else:
            todo.append((name, cell_config(base, cell, out / "cells" / name, "select", gpus > 1)))
    if rows:
        print(f"{len(rows)} finished cells found in {out / 'cells'}: skipped", flush=True)
    by_name = {cell_id(c): c for c in cells}

    def on_done(name, results):
        rows[name] = row_of(name, by_name[name], results, data.metric)
        write_reports(out, grid, [rows[cell_id(c)] for c in cells if cell_id(c) in rows], data.metric, None)

    run_cells(todo, gpus, data if gpus <= 1 else None, on_done)
    ordered = [rows[cell_id(c)] for c in cells]
    if all(r["val"] is None for r in ordered):
        write_reports(out, grid, ordered, data.metric, None)
        raise UserError(f"every cell of the grid diverged: all {len(ordered)} cells in {out / 'search.csv'}; "
                        "try lower learning rates")
    best = best_row(ordered)
    summary = dict(dataset=base.dataset, backbone=base.backbone, metric=data.metric, cells=len(cells),
                   best_cell=best["cell"], best_val=best["val"], grid={k: v for k, v in grid.items()})
    if final:
        final_out = out / "final" / best["cell"]
        results = read_done(final_out)
        if results is None:
            print(f"\n== final: {best['cell']} on train+val, reported on test", flush=True)
            results = ft.fine_tune(cell_config(base, by_name[best["cell"]], final_out, "final", False), data=data)
        summary.update(test=results["score"], test_at_test_size=results["score_test_size"],
                       train_size=results["train_size"], test_size=results["test_size"],
                       final_artifact=results.get("finetune_artifact"))
        if "score_fix" in results:
            summary["test_fix"] = results["score_fix"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_reports(out, grid, ordered, data.metric, summary)
    print("\n" + summary_line(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------------
# --all: the ten datasets x (baseline, distilled)

def search_all(args, grid, out: Path, gpus: int, datasets) -> list[dict]:
    """One search per dataset x backbone; a failed one is a row of n/a, and the sweep goes on."""
    if not datasets:
        raise UserError("--datasets is empty: name at least one dataset")
    backbones = {"baseline": args.baseline, "distilled": args.distilled}
    table, failed = [], []
    for name in datasets:
        row = {"dataset": name}
        for role, backbone in backbones.items():
            ns = argparse.Namespace(**{**vars(args), "dataset": name, "backbone": backbone})
            try:
                base = tcfg.check(tcfg.load(ns))
                s = search(base, grid, out / tcfg.dataset_label(name) / tcfg.backbone_label(backbone), gpus)
                row[role] = s["test"]
                row["metric"] = s["metric"]
            except Exception as e:  # a dataset that is not there, or a crash, does not stop the others
                if not isinstance(e, UserError):
                    traceback.print_exc()
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"{name} / {backbone}: failed: {reason}", flush=True)
                failed.append(f"{name} / {backbone}: {reason}")
                row[role] = None
        table.append(row)
        write_table(out, table, backbones)
    total = len(datasets) * len(backbones)
    if failed:
        first = failed[0] + (f"; and {len(failed) - 1} more, listed above" if len(failed) > 1 else "")
        if len(failed) == total:
            raise UserError(f"nothing ran: all {total} searches failed ({first}); table of n/a rows: "
                            f"{out / 'transfer_table.md'}")
        raise UserError(f"{len(failed)} of {total} searches failed ({first}); the other {total - len(failed)} "
                        f"are in {out / 'transfer_table.md'}")
    return table


def main(argv=None):
    parser = ArgumentParser(prog="python -m transfer.search", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    tcfg.add_arguments(parser)
    parser.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="grid axes (default: the recipe transfer/search)")
    parser.add_argument("--gpus", type=number_in(int, 0), default=None, help="GPUs to spread cells over (default: all present)")
    parser.add_argument("--no-final", action="store_true", help="skip retraining the best cell on train+val")
    parser.add_argument("--all", action="store_true", help="the ten datasets x (--baseline, --distilled)")
    parser.add_argument("--baseline", default=None, help="with --all: the baseline backbone (e.g. timm:resnet50d)")
    parser.add_argument("--distilled", default=None, help="with --all: the distilled backbone (e.g. r50_vd_ssld)")
    parser.add_argument("--datasets", default=",".join(TEN), help="with --all: comma-separated datasets")
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid) if args.grid else None
    gpus = gpu_count(args.gpus)
    if args.all:
        if not (args.baseline and args.distilled):
            raise UserError("--all needs --baseline BACKBONE and --distilled BACKBONE")
        out = Path(getattr(args, "run.out_dir") or "runs/transfer_search")
        return search_all(args, grid, out, gpus, [d.strip() for d in args.datasets.split(",") if d.strip()])
    base = tcfg.check(tcfg.load(args))
    if base.run.device == "cpu":
        gpus = 0
    out = Path(base.run.out_dir) if base.run.out_dir else Path("runs") / "transfer_search" / tcfg.default_out(base).relative_to(
        Path("runs") / "transfer")
    return search(base, grid, out, gpus, final=not args.no_final)


if __name__ == "__main__":
    run_cli(main)
