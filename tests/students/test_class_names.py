"""Class names travel with the student: recorded in the artifact, returned by load_student, dropped with a new
classifier, read from the older transfer location, absent (None) in older artifacts."""
import json

import pytest
import timm
import torch
from safetensors import safe_open

from distill.students.artifact import (ArtifactError, build_meta, class_names, load_student, save_student,
                                       with_classes)

NAMES = ["zebra", "apple", "mango", "kiwi", "fig"]


def tiny_meta(num_classes=5, **sections):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=num_classes)
    return model, build_meta("tiny", num_classes, arch="test_resnet", model=model, **sections)


def test_names_and_source_are_saved_and_loaded_back(tmp_path):
    model, meta = tiny_meta()
    save_student(tmp_path / "s.safetensors", model, with_classes(meta, NAMES, "data/train"))
    _, loaded = load_student(tmp_path / "s.safetensors")
    assert loaded["classes"] == NAMES and loaded["classes_source"] == "data/train"
    assert class_names(loaded) == NAMES
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:   # in the file, not only in memory
        assert json.loads(f.metadata()["ssld"])["classes"] == NAMES


def test_wrong_number_of_names_is_one_clear_error(tmp_path):
    model, meta = tiny_meta()
    with pytest.raises(ArtifactError, match="4 class names for a 5-class student \\(from data/train\\)"):
        with_classes(meta, NAMES[:4], "data/train")
    with pytest.raises(ArtifactError, match="6 class names"):   # save refuses hand-made metadata too
        save_student(tmp_path / "s.safetensors", model, {**meta, "classes": NAMES + ["extra"]})
    assert not (tmp_path / "s.safetensors").exists()


def test_old_artifact_without_names_loads_with_none_and_fallback_names(tmp_path):
    model, meta = tiny_meta(num_classes=3)
    save_student(tmp_path / "old.safetensors", model, meta)
    _, loaded = load_student(tmp_path / "old.safetensors")
    assert "classes" not in loaded and class_names(loaded) is None
    assert class_names(loaded, fallback=True) == ["class_0", "class_1", "class_2"]


def test_names_from_the_older_transfer_location_are_read(tmp_path):
    model, meta = tiny_meta(transfer=dict(dataset="folder:x", classes=NAMES))
    save_student(tmp_path / "t.safetensors", model, meta)
    assert class_names(load_student(tmp_path / "t.safetensors")[1]) == NAMES


def test_a_new_classifier_drops_the_names(tmp_path):
    model, meta = tiny_meta(transfer=dict(classes=NAMES))
    save_student(tmp_path / "s.safetensors", model, with_classes(meta, NAMES, "data/train"))
    _, same = load_student(tmp_path / "s.safetensors", num_classes=5)
    assert class_names(same) == NAMES                       # the same head: the names still hold
    _, new = load_student(tmp_path / "s.safetensors", num_classes=7)
    assert "classes" not in new and "classes_source" not in new
    assert class_names(new) is None                         # the transfer record no longer fits either


def test_unknown_names_replace_a_backbones_names(tmp_path):
    model, meta = tiny_meta()
    save_student(tmp_path / "s.safetensors", model, with_classes(with_classes(meta, NAMES, "a"), None))
    _, loaded = load_student(tmp_path / "s.safetensors")
    assert class_names(loaded) is None and loaded["classes_source"] is None
