"""python -m distill.predict: top-k class names from the artifact, a CSV for a folder, unreadable images
skipped and counted, one-line errors."""
import csv

import pytest
import torch
from helpers import FRUIT, make_artifact, make_named_artifact

from distill.core.errors import run_cli
from distill.students.artifact import load_student
from distill.students.predict import eval_transform, main, predict_files


@pytest.fixture
def images(tmp_path, demo_root):
    """Two real JPEGs in a nested folder and one corrupt file with an image extension."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, f in enumerate(sorted((demo_root / "val" / "circle").glob("*.jpg"))[:2]):
        (folder / ("sub" if i else "") / f.name).write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def test_prints_the_artifacts_class_names_with_probabilities(tmp_path, images, capsys):
    src = make_named_artifact(tmp_path / "named.safetensors", winner=5)
    image = next(images.glob("*.jpg"))
    main(["--student", str(src), str(image), "--top-k", "3"])
    first, summary = capsys.readouterr().out.strip().splitlines()
    path, entries = first.split(": ", 1)
    top = [entry.rsplit(" ", 1) for entry in entries.split(", ")]
    assert path == str(image) and top[0] == ["lime", "1.0000"]            # class 5 of FRUIT, by name
    assert len(top) == 3 and {name for name, _ in top} < set(FRUIT)
    assert "classified 1 image(s) at 48 px" in summary and "wrote" not in summary   # a file: no CSV by default


def test_probabilities_are_the_models_softmax_at_the_test_resolution(tmp_path, images):
    src = make_artifact(tmp_path / "plain.safetensors", num_classes=4)    # no names recorded
    model, meta = load_student(src)
    files = sorted(images.rglob("*.jpg"))
    result = predict_files(model, meta, files, top_k=10)
    with torch.no_grad():
        x = torch.stack([eval_transform(meta).load(str(f)) for f in files])
        assert x.shape[-1] == 48                                           # test_input_size, not input_size 32
        probs = model.eval()(x).softmax(-1)
    for (path, top), p in zip(result.rows, probs):
        assert len(top) == 4                                               # top-k capped at num_classes
        assert [name for name, _ in top] == [f"class_{i}" for i in p.argsort(descending=True).tolist()]
        assert [q for _, q in top] == pytest.approx(sorted(p.tolist(), reverse=True), abs=1e-6)


def test_a_folder_writes_a_csv_and_counts_the_unreadable(tmp_path, images, capsys, monkeypatch):
    src = make_named_artifact(tmp_path / "named.safetensors", winner=2)
    monkeypatch.chdir(tmp_path)
    main(["--student", str(src), str(images), "--top-k", "2", "--batch-size", "1"])
    out = capsys.readouterr().out
    assert "classified 2 image(s)" in out and "skipped 1 unreadable: " in out and "broken.png" in out
    assert "wrote predictions.csv" in out
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "top1_class", "top1_prob", "top2_class", "top2_prob"]
    assert sorted(r[0] for r in rows[1:]) == sorted(str(p) for p in images.rglob("*.jpg"))
    assert all(r[1] == "mango" and float(r[2]) > 0.99 >= float(r[4]) for r in rows[1:])
    main(["--student", str(src), str(images), "--csv", str(tmp_path / "elsewhere.csv")])
    assert (tmp_path / "elsewhere.csv").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--student", "no_such_student"], "no student artifact 'no_such_student'"),
    (["--student", "{src}", "{missing}"], "no such image or folder"),
    (["--student", "{src}", "{corrupt}"], "none of the 1 image(s) could be read"),
])
def test_bad_input_is_one_line(tmp_path, images, capsys, ssld_home, argv, message):
    src = make_named_artifact(tmp_path / "named.safetensors")
    fill = dict(src=src, missing=tmp_path / "nope.jpg", corrupt=images / "broken.png")
    argv = [a.format(**fill) for a in argv] + ([str(next(images.glob("*.jpg")))] if len(argv) == 2 else [])
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err
