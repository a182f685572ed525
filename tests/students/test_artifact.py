import re
import signal
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from distill.students import artifact
from distill.students.artifact import (ArtifactError, build_meta, load_student, read_meta, resolve_student, save_student)
from distill.students.zoo import ZOO, create_model
from helpers import make_artifact

R18 = ZOO["r18_vd"].arch  # the timm architecture the r18_vd zoo row names


def make_student(path, name="r18_vd", num_classes=10, seed=0, **sections):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    with torch.no_grad():  # non-default BN stats so a loader that drops buffers is caught
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    meta = build_meta(name, num_classes, model=model, **sections)
    save_student(path, model, meta)
    return model, meta


def assert_same_tensors(a: dict, b: dict, skip=()):
    assert set(a) == set(b)
    for k in a:
        if k not in skip:
            assert torch.equal(a[k], b[k]), k


def test_roundtrip_keeps_every_tensor_and_metadata(tmp_path):
    path = tmp_path / "s.safetensors"
    model, meta = make_student(path, pretrain=dict(weight_decay=7e-5, epochs=3, teacher="t", loss="ssld"))
    loaded, meta2 = load_student(path)
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    assert meta2 == meta
    assert meta2["arch"] == R18 and meta2["num_classes"] == 10
    assert meta2["pretrain"]["weight_decay"] == 7e-5
    assert meta2["recommended"]["transfer"] == [0.1, 0.1, 0.2, 0.2, 0.3]
    assert meta2["recommended"]["detection"] == [0.05, 0.05, 0.1, 0.1, 0.15]
    assert meta2["stages"]["layout"] == ["conv1,bn1", "layer1", "layer2", "layer3", "layer4"]
    prep = meta2["preprocessing"]
    assert (prep["input_size"], prep["test_input_size"], prep["crop_pct"]) == (224, 256, 0.875)
    assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.229, 0.224, 0.225]


def test_new_class_count_reinitialises_only_the_classifier(tmp_path):
    path = tmp_path / "s.safetensors"
    model, _ = make_student(path, num_classes=10)
    loaded, meta = load_student(path, num_classes=7)
    assert meta["num_classes"] == 7 and loaded.fc.out_features == 7
    assert_same_tensors({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")},
                        {k: v for k, v in loaded.state_dict().items() if not k.startswith("fc.")})
    assert loaded.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_timm_loads_the_artifact_directly(tmp_path):
    path = tmp_path / "s.safetensors"
    model, _ = make_student(path, num_classes=1000)
    direct = timm.create_model(R18, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_same_tensors(model.state_dict(), direct.state_dict())
    # another class count: tell timm the file's count too, or it drops the classifier
    model, _ = make_student(path, num_classes=10)
    direct = timm.create_model(R18, pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert_same_tensors(model.state_dict(), direct.state_dict())


def test_name_resolves_in_ssld_home_and_unknown_name_lists_known(tmp_path, ssld_home):
    make_student(ssld_home / "tiny_ssld.safetensors")
    assert resolve_student("tiny_ssld") == ssld_home / "tiny_ssld.safetensors"
    assert resolve_student("tiny_ssld.safetensors") == ssld_home / "tiny_ssld.safetensors"
    assert read_meta("tiny_ssld")["arch"] == R18
    with pytest.raises(ArtifactError) as e:
        resolve_student("r50_vd_ssld")
    msg = str(e.value)
    assert "tiny_ssld" in msg and str(ssld_home) in msg and "SSLD_HOME" in msg and "timm:ARCH" in msg


def test_home_is_ssld_home_else_the_user_cache_and_a_bare_name_resolves_there(tmp_path, monkeypatch):
    """$SSLD_HOME (with ~ expanded) when set, else ~/.cache/ssld of the user's $HOME; a bare name is found in
    that folder and only there."""
    monkeypatch.chdir(tmp_path)                                   # no NAME.safetensors in the current folder
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("SSLD_HOME", "~/models")
    custom, cache = tmp_path / "user" / "models", tmp_path / "user" / ".cache" / "ssld"
    assert artifact.ssld_home() == custom
    custom.mkdir(parents=True)
    make_artifact(custom / "tiny_ssld.safetensors")
    assert resolve_student("tiny_ssld") == custom / "tiny_ssld.safetensors"

    monkeypatch.delenv("SSLD_HOME")
    assert artifact.ssld_home() == cache
    with pytest.raises(ArtifactError, match=re.escape(str(cache))):   # $SSLD_HOME's folder is no longer searched
        resolve_student("tiny_ssld")
    cache.mkdir(parents=True)
    make_artifact(cache / "tiny_ssld.safetensors")
    assert resolve_student("tiny_ssld") == cache / "tiny_ssld.safetensors"
    assert read_meta("tiny_ssld")["arch"] == "test_resnet"


def test_mismatched_architecture_names_keys_and_shapes(tmp_path):
    path = tmp_path / "s.safetensors"
    other = create_model("r34_vd", num_classes=10)
    meta = build_meta("r18_vd", 10)  # says r18_vd, holds r34_vd tensors
    save_student(path, other, meta)
    with pytest.raises(ArtifactError) as e:
        load_student(path)
    msg = str(e.value)
    assert "unexpected layer1.2." in msg  # r34 has 3 blocks in layer1
    assert "do not fit" in msg
    meta = build_meta("r18_vd", 5)
    save_student(path, create_model("r18_vd", num_classes=10), meta)
    with pytest.raises(ArtifactError, match=r"fc.weight: file \(10, 512\) vs model \(5, 512\)"):
        load_student(path)


def test_foreign_or_corrupt_files_are_refused_clearly(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtifactError, match="not an ssld-kit student artifact"):
        load_student(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_student(junk)


def test_interrupted_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    make_student(path, seed=0)
    before = path.read_bytes()

    def dies_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_file", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        make_student(path, seed=1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # temporary file cleaned up


def test_sigkill_during_save_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "s.safetensors"
    make_student(path, seed=0)
    before = path.read_bytes()
    code = f"""
import os, signal, torch
from distill.students import artifact
def dies(tensors, filename, metadata=None):
    open(filename, 'wb').write(b'partial')
    os.kill(os.getpid(), signal.SIGKILL)
artifact.save_file = dies
from distill.students.zoo import create_model
m = create_model('r18_vd', num_classes=10)
artifact.save_student({str(path)!r}, m, artifact.build_meta('r18_vd', 10, model=m))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    _, meta = load_student(path)
    assert meta["arch"] == R18


def test_timm_spec_builds_plain_model_with_plain_multipliers():
    model, meta = load_student("timm:resnet10t", num_classes=3)
    assert meta["arch"] == "resnet10t" and meta["num_classes"] == 3
    assert meta["recommended"]["transfer"] == [1.0] * 5
    assert meta["pretrain"]["weight_decay"] is None
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_paths_in_the_current_folder_resolve(tmp_path, ssld_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_student(tmp_path / "r50_vd_ssld.safetensors")
    here = tmp_path / "r50_vd_ssld.safetensors"
    for name in ("r50_vd_ssld.safetensors", "./r50_vd_ssld", "r50_vd_ssld", "./r50_vd_ssld.safetensors"):
        assert resolve_student(name).resolve() == here, name
    with pytest.raises(ArtifactError):
        resolve_student("./elsewhere")  # a path is a path: no $SSLD_HOME lookup for it


def test_missing_student_error_says_how_to_get_one(ssld_home):
    with pytest.raises(ArtifactError) as e:
        resolve_student("r50_vd_ssld")
    msg = str(e.value)
    assert "python -m distill.convert --download r50_vd_ssld" in msg
    assert "ResNet50_vd_ssld_pretrained.pdparams --arch ResNet50_vd" in msg  # by hand, offline
    assert "configs/r50.yaml" in msg and "configs/r50_ft.yaml" in msg and "\n" not in msg
    with pytest.raises(ArtifactError, match=r"--download NAME \(python -m distill.zoo lists"):
        resolve_student("my_own_student")


def test_decay_kind_is_part_of_every_artifact():
    pretrain = build_meta("r18_vd", 10)["pretrain"]
    assert {"weight_decay", "weight_decay_kind", "weight_decay_source"} <= set(pretrain)
