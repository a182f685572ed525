"""ONNX export: every zoo architecture exports with a dynamic batch and matches PyTorch in onnxruntime within
1e-4; the file carries the preprocessing and class names; a deviating export is refused in one line and
leaves nothing behind."""
import json
import sys
import time

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from helpers import FRUIT, make_named_artifact

from distill.core.errors import UserError, run_cli
from distill.students import export as export_module
from distill.students.artifact import build_meta, load_student, with_classes
from distill.students.export import main
from distill.students.onnx_export import ONNX_FILE, TOLERANCE, OnnxParityError, export_onnx
from distill.students.zoo import ZOO, create_model

ZOO_SIZE = 64   # every zoo architecture accepts it (stride 32 leaves 2x2); export time is set by the weights


def well_conditioned(model: nn.Module, size: int) -> nn.Module:
    """Random weights in the state a trained network is in numerically: every residual branch on (timm
    zero-initialises the last norm of each block, which would hide the branch from the check), norm
    statistics calibrated so activations are unit scale, then every norm weight halved. Without the halving
    a deep random network is chaotic: float32 PyTorch alone then differs from float64 by up to 1e-3,
    which is no property of the export."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            if not m.weight.any():
                m.weight.fill_(0.25)
            m.momentum = None   # a cumulative average: the statistics of exactly this batch
        model.train()(torch.randn(8, 3, size, size))
        for m in norms:
            m.weight.mul_(0.5)
    return model.eval()


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_architecture_exports_and_matches_pytorch(name, tmp_path):
    start = time.perf_counter()
    torch.manual_seed(0)
    model = well_conditioned(create_model(name, num_classes=10), ZOO_SIZE)
    meta = build_meta(name, 10, model=model, preprocessing=dict(input_size=ZOO_SIZE, test_input_size=ZOO_SIZE))
    parity = export_onnx(model, with_classes(meta, [f"c{i}" for i in range(10)]), tmp_path / "m.onnx")
    assert parity.max_rel <= TOLERANCE and (tmp_path / "m.onnx").is_file()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, ZOO_SIZE, ZOO_SIZE]
    print(f"{name}: {parity.describe()}, {time.perf_counter() - start:.1f} s")   # the figures in docs/benchmarks.md


def test_the_file_carries_preprocessing_and_class_names_and_takes_any_batch(tmp_path):
    model, meta = load_student(make_named_artifact(tmp_path / "named.safetensors"))
    parity = export_onnx(model, meta, tmp_path / "m.onnx")   # at the test resolution, 48
    assert "generated demo scenes" in parity.checks[0] and parity.checks[1:] == ["random batch of 1", "random batch of 3"]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["classes"]) == FRUIT and props["num_classes"] == "8" and props["arch"] == "test_resnet"
    prep = json.loads(props["preprocessing"])
    assert (prep["onnx_input_size"], prep["input_size"], prep["test_input_size"]) == (48, 32, 48)
    assert prep["mean"] == meta["preprocessing"]["mean"] and prep["crop_pct"] == 0.875
    assert json.loads(props["ssld"]) == meta
    x = torch.randn(5, 3, 48, 48)
    with torch.no_grad():
        expected = model.eval()(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == (5, 8) and torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_cli_writes_onnx_into_the_folder_checked_on_the_given_images(tmp_path, demo_root, capsys):
    src = make_named_artifact(tmp_path / "named.safetensors")
    images = tmp_path / "check"
    images.mkdir()
    for f in sorted((demo_root / "val" / "circle").glob("*.jpg"))[:2]:
        (images / f.name).write_bytes(f.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    main([str(src), str(tmp_path / "out"), "--onnx", "--onnx-size", "40", "--check-images", str(images)])
    printed = capsys.readouterr().out
    assert "max relative difference" in printed and "2 of your images" in printed and "1 unreadable skipped" in printed
    assert "40 px, dynamic batch" in printed
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors", "README.md", ONNX_FILE}


class Drift(torch.autograd.Function):
    """Scales by 1.01 in PyTorch but exports as Identity: an op whose ONNX form differs."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.01

    @staticmethod
    def symbolic(g, x):
        return g.op("Identity", x)


class Drifting(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return Drift.apply(self.model(x))


def test_a_deviating_export_is_refused_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    src = make_named_artifact(tmp_path / "named.safetensors")
    model, meta = load_student(src)
    monkeypatch.setattr(export_module, "load_student", lambda name: (Drifting(model), meta))
    with pytest.raises(SystemExit) as stop:
        run_cli(main, [str(src), str(tmp_path / "new"), "--onnx"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "max relative difference 9.9" in err and "above 0.0001" in err   # 1.01 vs 1: |d| / max = 0.01 / 1.01
    assert not (tmp_path / "new").exists()                                 # no folder, no temporaries
    existing = tmp_path / "existing"   # a folder from an earlier export keeps its model.onnx untouched
    existing.mkdir()
    (existing / ONNX_FILE).write_bytes(b"earlier export")
    with pytest.raises(OnnxParityError):
        export_onnx(Drifting(model), meta, existing / ONNX_FILE)
    assert [p.name for p in existing.iterdir()] == [ONNX_FILE] and (existing / ONNX_FILE).read_bytes() == b"earlier export"


def test_onnx_flags_without_onnx_are_refused(tmp_path):
    src = make_named_artifact(tmp_path / "named.safetensors")
    with pytest.raises(UserError, match="add --onnx"):
        main([str(src), str(tmp_path / "out"), "--check-images", str(tmp_path)])


def test_missing_onnx_packages_say_how_to_install_them(tmp_path, monkeypatch):
    model, meta = load_student(make_named_artifact(tmp_path / "named.safetensors"))
    monkeypatch.setitem(sys.modules, "onnx", None)   # as if not installed
    with pytest.raises(UserError, match=r"pip install 'ssld-kit\[onnx\]'"):
        export_onnx(model, meta, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == [tmp_path / "named.safetensors"]


def test_a_model_torch_onnx_cannot_export_is_one_error_with_no_file(tmp_path, capfd):
    model, meta = load_student(make_named_artifact(tmp_path / "named.safetensors"))

    class WithHistogram(Drifting):   # aten::histc has no ONNX form
        def forward(self, x):
            logits = self.model(x)
            return logits + torch.histc(logits, 4).sum()

    with pytest.raises(UserError, match="torch.onnx cannot export this model at 48 px.*histc") as error:
        export_onnx(WithHistogram(model), meta, tmp_path / "m.onnx")
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == [tmp_path / "named.safetensors"]
    printed = capfd.readouterr()
    assert "Torch IR graph" not in printed.out + printed.err   # the exporter's graph dump is kept off the terminal
