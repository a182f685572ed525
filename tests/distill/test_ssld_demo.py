"""The one-command demo chain: generate data -> teacher from labels -> ssld student -> labels-only baseline."""
import json

from distill import demo
from distill.students.artifact import read_meta


def test_demo_pipeline_exports_a_student_and_compares_with_labels_only(tmp_path):
    tiny = ["epochs=1", "student.arch=timm:test_resnet", "data.batch_size=8", "data.workers=0", "data.input_size=32",
            "data.test_input_size=40", "log.progress=false", "eval.every_epochs=1"]
    argv = [str(tmp_path), "--num-classes", "3", "--train-per-class", "6", "--val-per-class", "2",
            "--unlabeled", "12", "--image-size", "48", *(a for o in tiny for a in ("-o", o))]
    summary = demo.main(argv)
    student = tmp_path / "student" / "demo_student.safetensors"
    meta = read_meta(student)
    assert meta["pretrain"]["loss"]["kind"] == "ssld"
    assert meta["pretrain"]["teacher"] == [str(tmp_path / "teacher" / "demo_teacher.safetensors")]
    assert [s["type"] for s in meta["pretrain"]["data"]] == ["folder", "list"]  # labeled + unlabeled pool
    assert set(summary) == {"teacher (labels)", "student (ssld, no labels)", "student (labels only)"}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # a finished step is not run again
    before = student.stat().st_mtime_ns
    demo.main(argv)
    assert student.stat().st_mtime_ns == before
