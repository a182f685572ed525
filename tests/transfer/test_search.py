"""Grid search: grid parsing, selection on val, retraining on train+val, restart skips finished cells,
reports (CSV, markdown, heatmap) and the --all table."""
import csv
import json

import pytest

import transfer.finetune as ft
import transfer.search as search
import transfer.search_report as search_report
from distill.core.errors import UserError, run_cli
from helpers import MULT, make_artifact

COMMON = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--image-size", "32",
          "-o", "eval.every_epochs=0", "-o", "optim.base_batch=8"]


def test_grid_axes_parse_with_aliases_and_colon_separated_multiplier_lists():
    grid = search.parse_grid(["lr=0.01,0.003", "wd=1e-4,1e-5", "lr_mult=1,1,1,1,1:0.1,0.1,0.2,0.2,0.3"])
    assert grid == {"optim.lr": [0.01, 0.003], "optim.weight_decay": [1e-4, 1e-5],
                    "optim.lr_mult": [[1.0] * 5, MULT]}
    cells = search.cells_of(grid)
    assert len(cells) == 8 and len({search.cell_id(c) for c in cells}) == 8
    assert search.cell_id(cells[-1]) == "lr=0.003_wd=1e-05_lr_mult=0.1-0.1-0.2-0.2-0.3"
    with pytest.raises(UserError, match="not a config key"):
        search.parse_grid(["lrate=0.1"])
    with pytest.raises(UserError, match="wrong length"):
        search.parse_grid(["lr_mult=1,1,1"])


def test_default_grid_is_7x7_plus_multiplier_lists_for_distilled_backbones():
    plain = search.default_grid({"recommended": {"transfer": [1.0] * 5}})
    assert list(plain) == ["optim.lr", "optim.weight_decay"] and len(search.cells_of(plain)) == 49
    distilled = search.default_grid({"recommended": {"transfer": MULT}})
    assert distilled["optim.lr_mult"] == [MULT, [1.0] * 5] and len(search.cells_of(distilled)) == 98


def test_search_selects_on_val_retrains_best_on_trainval_and_skips_finished_cells(tmp_path, demo_root,
                                                                                  monkeypatch):
    out = tmp_path / "search"
    argv = ["--dataset", f"folder:{demo_root}", "--backbone", "timm:test_resnet", "--out-dir", str(out), *COMMON,
            "--grid", "lr=0.05,0.01,1e6", "wd=1e-4"]
    summary = search.main(argv)
    with open(out / "search.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == ["lr=0.05_wd=0.0001", "lr=0.01_wd=0.0001", "lr=1e+06_wd=0.0001"]
    assert rows[2]["diverged"] == "True" and rows[2]["val"] == ""   # recorded, not fatal, never selected
    rows = rows[:2]
    best = max(rows, key=lambda r: float(r["val"]))
    assert summary["best_cell"] == best["cell"] and summary["best_val"] == pytest.approx(float(best["val"]))
    cell = json.loads((out / "cells" / rows[1]["cell"] / "results.json").read_text())
    assert cell["eval_split"] == "val" and cell["finetune"]["at_train_size"]["n"] == 8     # selection on val
    final = json.loads((out / "final" / best["cell"] / "results.json").read_text())
    assert final["eval_split"] == "test" and final["finetune"]["at_train_size"]["n"] == 24  # reported on test
    assert summary["test"] == final["score"] and summary["test_at_test_size"] == final["score_test_size"]
    assert "Best cell" in (out / "search.md").read_text() and (out / "search.png").stat().st_size > 0

    trained = []
    real = ft.fine_tune
    monkeypatch.setattr(ft, "fine_tune", lambda cfg, **kw: trained.append(cfg.run.out_dir) or real(cfg, **kw))
    search.main(argv[:-2] + ["lr=0.05,0.01,1e6,0.002", "wd=1e-4"])   # a restart with one more cell
    assert trained[0] == str(out / "cells" / "lr=0.002_wd=0.0001")
    assert not [t for t in trained if "/cells/" in t and "lr=0.002" not in t]   # finished cells skipped
    with open(out / "search.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_all_writes_the_baseline_vs_distilled_table_and_survives_a_missing_dataset(tmp_path, demo_root):
    distilled = make_artifact(tmp_path / "tiny_ssld.safetensors")
    out = tmp_path / "all"
    with pytest.raises(UserError, match=r"^2 of 4 searches failed \(flowers102 / timm:test_resnet: .*the other 2 "):
        search.main(["--all", "--baseline", "timm:test_resnet", "--distilled", str(distilled),
                     "--datasets", f"folder:{demo_root},flowers102", "--data-root", str(tmp_path / "none"),
                     "--out-dir", str(out), *COMMON, "--grid", "lr=0.05"])
    table = json.loads((out / "transfer_table.json").read_text())   # what ran is still reported
    assert [r["dataset"] for r in table] == [f"folder:{demo_root}", "flowers102"]
    assert table[0]["baseline"] is not None and table[0]["distilled"] is not None
    assert table[1]["baseline"] is None and table[1]["distilled"] is None
    text = (out / "transfer_table.md").read_text()
    assert "| flowers102 |  | n/a | n/a |" in text and "| baseline | distilled |" in text
    # the distilled backbone's search also tried its recommended multipliers
    cells = sorted(p.name for p in (out / f"folder-{demo_root.name}" / "tiny_ssld" / "cells").iterdir())
    assert cells == ["lr=0.05_lr_mult=0.1-0.1-0.2-0.2-0.3", "lr=0.05_lr_mult=1-1-1-1-1"]


def test_a_sweep_where_nothing_ran_exits_2_with_one_line(tmp_path, capsys):
    """--all on a machine without the datasets: a script must not read the n/a table as success."""
    out = tmp_path / "all"
    argv = ["--all", "--baseline", "timm:test_resnet", "--distilled", "timm:test_resnet", "--datasets",
            "flowers102,pets", "--data-root", str(tmp_path / "none"), "--out-dir", str(out), *COMMON]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(search.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: nothing ran: all 4 searches failed (flowers102 / timm:test_resnet: ")
    assert (out / "transfer_table.md").read_text().count("| n/a | n/a |") == 2
    with pytest.raises(UserError, match="--datasets is empty"):
        search.main([*argv[:5], "--datasets", ",", *argv[7:]])


def test_a_search_whose_cells_all_diverged_fails_but_keeps_its_table(tmp_path, demo_root):
    out = tmp_path / "search"
    with pytest.raises(UserError, match="every cell of the grid diverged: all 2 cells"):
        search.main(["--dataset", f"folder:{demo_root}", "--backbone", "timm:test_resnet", "--out-dir", str(out),
                     *COMMON, "--grid", "lr=1e6,1e7"])
    with open(out / "search.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["diverged"] for r in rows] == ["True", "True"]


def test_heatmap_shares_one_colour_scale_with_a_bar_and_legible_labels(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    saved, real_savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig) or real_savefig(fig, *a, **k))
    grid = {"optim.lr": [0.1, 0.01], "optim.weight_decay": [1e-4, 1e-5], "optim.lr_mult": [MULT, [1.0] * 5]}
    cells = search.cells_of(grid)
    rows = [{"cell": search_report.cell_id(c), "val": None if i == 0 else 50.0 + 5 * i} for i, c in enumerate(cells)]
    search_report.plot_heatmap(tmp_path / "search.png", grid, rows, "top1")
    fig = saved[0]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and len(fig.axes) == 3                        # two lr_mult panels + the colour bar
    assert "top-1 accuracy (%)" in fig.axes[2].get_ylabel()
    assert {ax.images[0].norm.vmin for ax in panels} == {55.0} and {ax.images[0].norm.vmax for ax in panels} == {85.0}
    ink = {t.get_text(): t.get_color() for ax in panels for t in ax.texts}
    assert ink["85.0"] == "black" and ink["55.0"] == "white" and "diverged" in ink   # dark on yellow, light on purple
    best = [p for ax in panels for p in ax.patches]
    assert len(best) == 1 and best[0].get_xy() == (0.5, 0.5)              # the 85.0 cell: lr 0.01, wd 1e-5
