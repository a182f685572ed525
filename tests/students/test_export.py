"""A student exported as a timm / Hugging Face folder loads in plain timm exactly, and back with its metadata."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from helpers import FRUIT, make_artifact, make_named_artifact

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


@pytest.fixture
def named_folder(tmp_path):
    src = make_named_artifact(tmp_path / "named.safetensors", winner=5)
    return src, export_folder(src, tmp_path / "named_timm")


def test_config_names_the_classes_and_leaves_num_classes_out_of_model_args(named_folder, exported):
    config = json.loads((named_folder[1] / "config.json").read_text())
    assert config["label_names"] == FRUIT and config["num_classes"] == 8
    assert "num_classes" not in config.get("model_args", {})
    assert "lime" in (named_folder[1] / "README.md").read_text()
    unnamed = json.loads((exported[1] / "config.json").read_text())   # no names recorded: none invented
    assert "label_names" not in unnamed and "num_classes" not in unnamed.get("model_args", {})
    model = timm.create_model(f"local-dir:{named_folder[1]}", pretrained=True)   # timm still reads it
    assert model.num_classes == 8 and model.pretrained_cfg["label_names"] == FRUIT


def test_transformers_loads_the_folder_with_the_same_logits_and_class_names(named_folder):
    import transformers
    src, out = named_folder
    original, _ = load_student(src)
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
    assert hf.config.id2label == dict(enumerate(FRUIT))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).logits, original.eval()(x), rtol=0, atol=1e-6)


def test_transformers_pipeline_names_the_class(named_folder):
    import transformers
    from distill.core.demo_data import SHAPES, labeled_scene, render_scene

    image = render_scene(labeled_scene(0, "val", 0, 0, SHAPES, 64))
    top = transformers.pipeline("image-classification", model=str(named_folder[1]))(image)
    assert top[0]["label"] == "lime" and top[0]["score"] > 0.99   # class 5 of FRUIT, by name


def test_a_paddleclas_architecture_loads_in_transformers_once_distill_is_imported(tmp_path):
    """transformers builds the model with timm.create_model: the *_paddle archs exist after `import distill`
    (imported here by the tests, as a user's script must)."""
    import transformers
    from distill.students.artifact import build_meta, save_student, with_classes
    from distill.students.zoo import create_model

    torch.manual_seed(0)
    model = create_model("pplcnet_x0_25", num_classes=3).eval()
    meta = with_classes(build_meta("pplcnet_x0_25", 3, model=model), ["a", "b", "c"], "x")
    save_student(tmp_path / "lc.safetensors", model, meta)
    out = export_folder(tmp_path / "lc.safetensors", tmp_path / "lc")
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).logits, model(x), rtol=0, atol=1e-6)
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert "import distill" in (out / "README.md").read_text()
