"""Without detectron2 the detectron2 engine is one line saying how to install it (runs where detectron2 is absent
too, unlike test_detectron2.py)."""
import importlib
import sys

import pytest

from distill.core.errors import UserError


def test_without_detectron2_the_engine_is_a_one_line_error_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)          # import detectron2 now fails
    for name in [n for n in sys.modules if n.split(".")[:2] == ["detection", "detectron2"]]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(UserError) as error:
        importlib.import_module("detection.detectron2.train")
    message = str(error.value)
    assert message.startswith("detectron2 is not installed") and "\n" not in message
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git' --no-build-isolation" in message


def test_detection_train_engine_detectron2_without_it_exits_with_that_one_line(monkeypatch, capsys, tmp_path):
    from detection import train as det_train
    from distill.core.errors import run_cli

    monkeypatch.setitem(sys.modules, "detectron2", None)
    for name in [n for n in sys.modules if n.split(".")[:2] == ["detection", "detectron2"]]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(SystemExit) as stop:
        run_cli(det_train.main, ["-c", "detection/demo", "--engine", "detectron2", "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: detectron2 is not installed") and err.count("\n") == 1
