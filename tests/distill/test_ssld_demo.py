"""The one-command demo chain at tiny sizes: every step's output, the tables against summary.json, resume, --force."""
import json
import re

import pytest
from PIL import Image

from distill import demo
from distill.students.artifact import read_meta


def run(out, *extra):
    return demo.main([str(out), "--scale", "tiny", "--quiet", "--threads", "1", *extra])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run(out)


def _rows(text: str, title_start: str) -> list[list[str]]:
    """The rows of one markdown table in report.md (after the bold title starting with title_start)."""
    block = text.split(f"**{title_start}", 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_chain_writes_every_step_and_the_students_are_what_they_claim(chain):
    out, summary = chain
    assert all(v["status"] == "ran" for v in summary["steps"].values())
    teacher = out / "teacher" / "demo_teacher.safetensors"
    student, labels_only = read_meta(out / "student" / "demo_student.safetensors"), \
        read_meta(out / "labels_only" / "demo_labels_only.safetensors")
    mined = read_meta(out / "mined_student" / "demo_mined_student.safetensors")
    assert student["pretrain"]["loss"]["kind"] == mined["pretrain"]["loss"]["kind"] == "ssld"
    assert student["pretrain"]["teacher"] == mined["pretrain"]["teacher"] == [str(teacher)]
    assert [s["path"] for s in student["pretrain"]["data"]] == ["labeled_list.txt", "unlabeled_list.txt"]
    assert [s["path"] for s in mined["pretrain"]["data"]] == ["mined/ssld_train_list.txt"]
    assert labels_only["pretrain"]["loss"]["kind"] == "ce" and labels_only["pretrain"]["teacher"] is None
    # equal budgets: every student ran the same number of steps
    last = {name: (out / name / "metrics.csv").read_text().splitlines()[-1].split(",")[0]
            for name in ("student", "labels_only", "mined_student")}
    assert len(set(last.values())) == 1, last
    # the mined list: the labeled subset, then pool images the teacher picked, none a dedup removal
    merged = (out / "data" / "mined" / "ssld_train_list.txt").read_text().splitlines()
    labeled = (out / "data" / "labeled_list.txt").read_text().splitlines()
    assert [line.split()[0] for line in merged[:len(labeled)]] == ["../" + line.split()[0] for line in labeled]
    kept = set((out / "data" / "mined" / "pool_kept.txt").read_text().split())
    assert merged[len(labeled):] and all(line.split()[0] in kept for line in merged[len(labeled):])
    assert summary["mining"]["mined_lines"] == len(merged) - len(labeled)
    # downstream: a task of new classes, 6 transfer runs with the multipliers asked for, 3 detectors
    downstream = json.loads((out / "downstream" / "demo_data.json").read_text())
    assert not set(downstream["classes"]) & set(json.loads((out / "data" / "demo_data.json").read_text())["classes"])
    for key, row in summary["transfer"].items():
        results = json.loads((out / "transfer" / key.replace("/", "_") / "results.json").read_text())
        assert results["lr_mult"] == row["multipliers"] == list(demo.MULTIPLIERS[key.split("/")[1]])
        assert results["score_fix"] == row["top1_fix"] and "fix" in results
    assert set(summary["detection"]) == {"ssld", "labels_only", "random_init"}
    for name, row in summary["detection"].items():
        assert json.loads((out / "detection" / name / "metrics.json").read_text())["AP"] == row["AP"]


def test_tables_in_terminal_markdown_and_picture_match_summary(chain, capsys):
    out, summary = chain
    assert json.loads((out / "summary.json").read_text()) == summary
    md = (out / "report.md").read_text()
    cls = _rows(md, "Classification")
    assert [r[0] for r in cls] == [t for _, t in demo.CLASSIFICATION_ROWS]
    for row, (key, _) in zip(cls, demo.CLASSIFICATION_ROWS):
        assert float(row[3]) == pytest.approx(summary["classification"][key]["top1"], abs=0.006)
    transfer = _rows(md, "Transfer")
    assert len(transfer) == 6
    for row in transfer:
        key = {t: b for b, t in demo.BACKBONES}[row[0]] + "/" + row[1]
        assert float(row[4]) == pytest.approx(summary["transfer"][key]["top1_fix"], abs=0.006)
    det = _rows(md, "Detection")
    assert [float(r[1]) for r in det] == [round(summary["detection"][b]["AP"], 1) for b, _ in demo.BACKBONES]
    c = summary["classification"]
    assert summary["gaps"]["ssld - labels_only (top-1)"] == pytest.approx(c["ssld"]["top1"] - c["labels_only"]["top1"])
    gaps = dict((r[0], float(r[1])) for r in _rows(md, "Gaps"))
    assert gaps == pytest.approx({k: round(v, 2) for k, v in summary["gaps"].items()}, abs=0.006)
    # the terminal shows the same tables (the rerun prints them again)
    run(out)
    printed = capsys.readouterr().out
    for title in ("Classification", "Transfer", "Detection", "Gaps"):
        assert title in printed
    for key, _ in demo.CLASSIFICATION_ROWS:
        assert f"{summary['classification'][key]['top1']:.2f}" in printed
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] >= 1200 and im.size[1] >= 500


def test_rerun_skips_finished_steps_an_interrupted_one_continues_and_force_redoes(chain):
    out, first = chain
    artifact = out / "student" / "demo_student.safetensors"
    stamp = artifact.stat().st_mtime_ns
    # "interrupt": one transfer run and one detector never finished
    (out / "transfer" / "ssld_uniform" / "results.json").unlink()
    (out / "detection" / "labels_only" / "metrics.json").unlink()
    again = run(out)
    ran = {k for k, v in again["steps"].items() if v["status"] == "ran"}
    assert ran == {"transfer:ssld:uniform", "detection:labels_only"}
    assert artifact.stat().st_mtime_ns == stamp
    assert again["classification"] == first["classification"]
    # --force redoes every step it reaches (here up to the teacher)
    teacher = out / "teacher" / "demo_teacher.safetensors"
    stamp = teacher.stat().st_mtime_ns
    assert run(out, "--force", "--until", "teacher") is None
    assert teacher.stat().st_mtime_ns != stamp
    assert (out / "data" / "demo_data.json").is_file()


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    from distill.core.errors import run_cli
    with pytest.raises(SystemExit) as exit_:
        run_cli(demo.main, [str(tmp_path), "--seed", "-1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.fullmatch(r"error: --seed must be >= 0, got -1\n", err)


def test_bench_reports_mean_spread_and_a_gap_crossing_zero_as_not_shown():
    from distill import demo_bench

    def summary(a, b, c):
        return {"gaps": {"ssld - labels_only (top-1)": a, "mined - unmined ssld (top-1)": b,
                         "transfer: reduced - uniform, random init": c}}

    runs = {0: summary(10.0, 2.0, -1.0), 1: summary(14.0, -1.0, -3.0), 2: summary(12.0, 5.0, -2.0)}
    g = demo_bench.aggregate(runs)
    first = g["ssld - labels_only (top-1)"]
    assert first["values"] == [10.0, 14.0, 12.0] and first["mean"] == pytest.approx(12.0)
    assert first["std"] == pytest.approx(2.0) and first["shown"]
    assert not g["mined - unmined ssld (top-1)"]["shown"]                 # one seed below zero
    assert g["transfer: reduced - uniform, random init"]["shown"]          # expected negative, and it is
    result = dict(seeds=[0, 1, 2], machine_start="cpu", load_end="1.0", seconds=[1.0, 2.0, 3.0], gaps=g,
                  absolute={"top-1: x": [1.0, 2.0, 3.0]})
    md = demo_bench.format_markdown(result)
    row = next(line for line in md.splitlines() if line.startswith("| mined - unmined"))
    assert "+2.00 | -1.00 | +5.00 | +2.00" in row and "crosses zero" in row
    assert "| yes |" in next(line for line in md.splitlines() if line.startswith("| ssld - labels_only"))
