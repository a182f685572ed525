"""A student exported as a timm / Hugging Face folder loads in plain timm exactly, and back with its metadata."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from helpers import make_artifact

from distill.core.errors import UserError
from distill.students.artifact import load_student
from distill.students.export import export_folder, main, push_folder


@pytest.fixture
def exported(tmp_path):
    src = make_artifact(tmp_path / "tiny.safetensors", num_classes=7)
    return src, export_folder(src, tmp_path / "tiny_timm")


def test_timm_local_dir_loads_every_tensor_and_gives_the_same_logits(exported):
    src, out = exported
    original, meta = load_student(src)
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    a, b = original.state_dict(), model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(original.eval()(x), model.eval()(x))
    cfg = model.pretrained_cfg  # timm took the student's preprocessing, not test_resnet's defaults
    assert cfg["input_size"] == (3, 32, 32) and cfg["test_input_size"] == (3, 48, 48)
    assert (cfg["crop_pct"], cfg["interpolation"]) == (0.875, "bilinear")
    assert list(cfg["mean"]) == meta["preprocessing"]["mean"] and list(cfg["std"]) == meta["preprocessing"]["std"]


def test_config_json_has_timm_fields_and_keeps_the_ssld_metadata(exported):
    src, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 7
    assert {"input_size", "crop_pct", "mean", "std", "interpolation"} <= set(config["pretrained_cfg"])
    assert "url" not in config["pretrained_cfg"] and "hf_hub_id" not in config["pretrained_cfg"]
    assert config["ssld"] == load_student(src)[1]
    assert "library_name: timm" in (out / "README.md").read_text()


def test_load_student_reads_the_folder_back_with_its_metadata(exported):
    src, out = exported
    model, meta = load_student(f"local-dir:{out}")
    original, meta0 = load_student(src)
    assert meta == meta0 and meta["pretrain"]["weight_decay"] == 3e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.state_dict().items())
    assert load_student(out)[1] == meta0  # the folder's path works too
    with pytest.raises(UserError, match="no model folder"):
        load_student(f"local-dir:{out}_missing")


def test_hf_hub_name_reads_a_cached_repo_offline(exported, tmp_path):
    """hf-hub:ORG/NAME through huggingface_hub's own cache, offline (no network in tests)."""
    _, out = exported
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((out / name).read_bytes())
    code = ("from distill.students.artifact import load_student; m, meta = load_student('hf-hub:someone/tiny'); "
            "print(meta['arch'], meta['num_classes'], meta['pretrain']['weight_decay'])")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["test_resnet", "7", "3e-05"]


def test_cli_writes_the_folder_and_push_needs_huggingface_hub(tmp_path, capsys, monkeypatch):
    src = make_artifact(tmp_path / "tiny.safetensors")
    main([str(src), str(tmp_path / "out")])
    assert "local-dir:" in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(UserError, match="pip install huggingface_hub"):
        push_folder(tmp_path / "out", "org/name")
