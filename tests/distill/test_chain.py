"""`python -m distill.chain` end to end on real scans at a tiny scale (4 digit classes, 6 labels each, a
pool of other scans, photographs and a broken file): every step's output, the defaults printed with why,
the report against the artifacts, the ONNX file and predict, resume / --force, and the export's refusal."""
import contextlib
import io
import json
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from distill.chain import __main__ as chain
from distill.core.errors import run_cli
from distill.students.artifact import class_names, load_student, read_meta
from real_images import write_digits

CLASSES = ["0", "1", "2", "3"]
SETTINGS = ("image_size", "test_size", "batch_size", "teacher_epochs", "teacher_lr", "epochs", "lr", "fix_epochs",
            "k", "dedup")


def run(out, data, *extra, unlabeled=True):
    argv = [str(out), "--data", str(data / "data"), "--teacher", "timm:test_resnet", "--student", "timm:test_resnet",
            "--epochs", "1", "--teacher-epochs", "1", "--workers", "0", "--threads", "1", "--quiet",
            *(["--unlabeled", str(data / "pool")] if unlabeled else []), *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = chain.main(argv)
    return summary, err.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = write_digits(tmp_path_factory.mktemp("digits"), classes=4, labeled=6, val_fraction=0.05, pool=5,
                        photos=4)
    (root / "pool" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


@pytest.fixture(scope="module")
def ran(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    summary, err = run(out, digits)
    return out, summary, err


def test_every_step_runs_and_the_students_are_what_they_claim(ran, digits):
    out, summary, _ = ran
    assert [k for k, v in summary["steps"].items() if v["status"] != "ran"] == []
    assert list(summary["steps"]) == ["teacher:init", "teacher", "init", "baseline", "mining", "ssld", "fix:baseline",
                                      "fix:ssld", "export", "report"]
    teacher, baseline, ssld = (read_meta(summary["models"][k]) for k in ("teacher", "baseline", "ssld"))
    assert teacher["transfer"]["dataset"] == f"folder:{digits / 'data'}" and class_names(teacher) == CLASSES
    assert baseline["pretrain"]["loss"]["kind"] == "ce" and baseline["pretrain"]["teacher"] is None
    assert ssld["pretrain"]["loss"]["kind"] == "ssld" and ssld["pretrain"]["teacher"] == [summary["teacher"]]
    assert class_names(baseline) == class_names(ssld) == CLASSES
    # the same init, the same number of steps: only the loss and the data differ
    inits = {a for k in ("baseline", "ssld") for a in shlex.split((out / k / "command.txt").read_text())
             if a.startswith("student.init=")}
    assert inits == {"student.init=" + json.dumps(str(out / "init" / "init.safetensors"))}
    last = {k: (out / k / "metrics.csv").read_text().splitlines()[-1].split(",")[0] for k in ("baseline", "ssld")}
    assert len(set(last.values())) == 1, last
    # SSLD trains on train + mined; mined images are pool images dedup kept, none a removal
    assert [s["path"] for s in ssld["pretrain"]["data"]] == [str(out / "mined" / "ssld_train_list.txt")]
    merged = (out / "mined" / "ssld_train_list.txt").read_text().splitlines()
    train = sorted((digits / "data" / "train").rglob("*.png"))
    assert len(merged) > len(train)
    kept = {line.split()[0] for line in (out / "mined" / "pool_kept.txt").read_text().splitlines()}
    assert all(line.split()[0] in kept for line in merged[len(train):])
    mined = json.loads((out / "mined" / "mined_summary.json").read_text())
    assert mined["skipped_images"] == 1   # the broken file: skipped and counted, the chain went on


def test_every_default_is_printed_with_why_and_the_flag(ran):
    _, summary, err = ran
    lines = {m.group(1): m for m in re.finditer(r"^\[chain\]   (\w+) (.+?) \((.+); (--[\w-]+|-o \S+)\)$", err, re.M)}
    assert set(lines) == set(SETTINGS)
    assert lines["image_size"].group(2) == "32" and "median shorter side 32 px" in lines["image_size"].group(3)
    assert lines["epochs"].group(3) == "given" and lines["epochs"].group(4) == "--epochs"
    assert lines["batch_size"].group(2) == "8" and "24 train images" in lines["batch_size"].group(3)
    assert lines["test_size"].group(2) == "36"
    plan = json.loads((ran[0] / "plan.json").read_text())
    assert {k: str(v["value"]) for k, v in plan["settings"].items() if k != "dedup"} == \
        {k: m.group(2) for k, m in lines.items() if k != "dedup"}


def _table(md: str, title: str) -> list[list[str]]:
    block = md.split(f"**{title}", 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_report_numbers_are_the_artifacts_and_result_files(ran):
    out, summary, _ = ran
    md = (out / "report.md").read_text()
    rows = {r[0]: r for r in _table(md, "Accuracy on val")}
    assert set(rows) == {"teacher", "student, labels only", "SSLD student"}
    teacher = read_meta(summary["models"]["teacher"])["transfer"]
    assert float(rows["teacher"][2]) == pytest.approx(teacher["score"], abs=0.006)
    for title, key in (("student, labels only", "baseline"), ("SSLD student", "ssld")):
        meta = read_meta(summary["models"][key])["pretrain"]
        fix = json.loads((out / "fix" / key / "results.json").read_text())
        assert float(rows[title][2]) == pytest.approx(meta["top1"], abs=0.006)
        assert float(rows[title][3]) == pytest.approx(meta["top1_test_res"], abs=0.006)
        assert float(rows[title][4]) == pytest.approx(fix["fix"]["score"], abs=0.006)
        assert float(rows[title][5]) == pytest.approx(fix["score_fix"], abs=0.006)
    dedup = json.loads((out / "mined" / "pool_kept_summary.json").read_text())
    assert f"dedup removed {dedup['removed']} " in md and f"Pool {dedup['pool_images'] + dedup['skipped']} images" in md
    confusion = summary["report"]["confusion"]
    assert np.array(confusion["matrix"]).sum() == confusion["images"] == summary["plan"]["val_counts"]["0"] * 4
    assert json.loads((out / "summary.json").read_text())["report"]["accuracy"]["ssld"]["top1"] == \
        read_meta(summary["models"]["ssld"])["pretrain"]["top1"]
    for role in ("teacher", "baseline", "ssld"):
        speed = summary["report"]["speed"][role]
        assert speed["params_m"] > 0 and speed["torch_ms"] > 0 and speed["onnx_img_s"] > 0
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] >= 1000


def test_export_is_a_checked_onnx_and_predict_names_the_classes(ran, digits):
    import onnxruntime as ort

    from distill.students.predict import eval_transform, predict_files
    out, summary, _ = ran
    folder = out / "export" / "ssld_student"
    model, meta = load_student(str(folder))
    assert class_names(meta) == CLASSES and meta["chain"]["serving_size"] == meta["preprocessing"]["test_input_size"]
    session = ort.InferenceSession(str(folder / "model.onnx"))
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == CLASSES
    files = sorted((digits / "data" / "val").rglob("*.png"))[:4]
    x = torch.stack([eval_transform(meta)(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        expected = model.eval()(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    predictions = predict_files(model, meta, files, top_k=2)
    assert len(predictions.rows) == 4 and all(name in CLASSES for _, top in predictions.rows for name, _ in top)


def test_rerun_skips_an_interrupted_step_continues_and_force_redoes(ran, digits):
    out, first, _ = ran
    ssld = out / "ssld" / "ssld_student.safetensors"
    stamp = ssld.stat().st_mtime_ns
    (out / "fix" / "ssld" / "results.json").unlink()   # "interrupted" before its results were written
    again, err = run(out, digits)
    assert {k for k, v in again["steps"].items() if v["status"] == "ran"} == {"fix:ssld"}
    assert ssld.stat().st_mtime_ns == stamp and "baseline: done before, skipped" in err
    assert again["report"]["accuracy"] == first["report"]["accuracy"]
    teacher = out / "teacher" / "run" / "model.safetensors"
    stamp = teacher.stat().st_mtime_ns
    assert run(out, digits, "--force", "--until", "teacher")[0] is None
    assert teacher.stat().st_mtime_ns != stamp


def test_without_a_pool_a_given_teacher_teaches_on_train_alone(ran, digits, tmp_path):
    out, summary, _ = ran
    data = tmp_path / "data"   # train/ only: the chain draws val itself
    data.mkdir()
    import shutil
    shutil.copytree(digits / "data" / "train", data / "data" / "train")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        chain.main([str(tmp_path / "out"), "--data", str(data / "data"), "--teacher", summary["models"]["teacher"],
                    "--student", "timm:test_resnet", "--epochs", "1", "--workers", "0", "--threads", "1", "--quiet",
                    "--until", "ssld"])
    err = err.getvalue()
    assert "teacher " + summary["models"]["teacher"] + ": used as given (its 4 class names are DATA's" in err
    assert "no --unlabeled: the SSLD student distils on train alone" in err and "teacher_epochs" not in err
    view = tmp_path / "out" / "data"
    assert sorted(p.name for p in (view / "val").iterdir()) == CLASSES
    val = {p.name for p in (view / "val").rglob("*.png")}
    train = {p.name for p in (view / "train").rglob("*.png")}
    assert val and not val & train and len(val | train) == 24        # a split of train, nothing lost
    ssld = read_meta(tmp_path / "out" / "ssld" / "ssld_student.safetensors")
    assert ssld["pretrain"]["data"] == [dict(type="folder", path=str(view / "train"))]
    assert ssld["pretrain"]["teacher"] == [summary["models"]["teacher"]]


def test_a_failed_onnx_check_is_one_line_and_writes_no_export(ran, digits, monkeypatch, capsys):
    from distill.students import onnx_export
    out, _, _ = ran
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(out / "export")
    monkeypatch.setattr(onnx_export, "measure_parity",
                        lambda *a, **k: onnx_export.Parity(0.5, 1.0, ["monkeypatched"]))
    argv = [str(out), "--data", str(digits / "data"), "--unlabeled", str(digits / "pool"), "--teacher",
            "timm:test_resnet", "--student", "timm:test_resnet", "--epochs", "1", "--teacher-epochs", "1",
            "--workers", "0", "--threads", "1", "--quiet"]
    with pytest.raises(SystemExit) as stop:
        run_cli(chain.main, argv)
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[chain]")]
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: export: ONNX check failed")
    assert "--no-onnx" in err[0]
    assert not (out / "export" / "ssld_student").exists()
    assert not list((out / "export").glob("**/*.onnx"))
