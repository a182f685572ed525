import subprocess
import sys

import pytest

from distill.students import zoo
from distill.core.errors import UserError


def test_r50_vd_is_resnet50d_with_paddleclas_tensor_count():
    model = zoo.create_model("r50_vd", num_classes=1000)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 277 and sum(v.numel() for v in state.values()) == 25_629_512  # DESIGN.md


@pytest.mark.parametrize("name", ["r18_vd", "mv3_small", "mv2"])
def test_zoo_name_builds_its_timm_arch_with_class_count(name):
    model = zoo.create_model(name, num_classes=7)
    assert model.pretrained_cfg["architecture"] == zoo.get_entry(name).arch
    assert model.get_classifier().out_features == 7


def test_unknown_names_suggest():
    with pytest.raises(UserError, match="did you mean 'r50_vd'.*known: r18_vd"):
        zoo.get_entry("r50vd")
    with pytest.raises(UserError, match="unknown timm model 'resnet5O'"):
        zoo.get_entry("timm:resnet5O")


def test_timm_names_pick_family_from_arch():
    assert zoo.get_entry("timm:resnet50d").family == "resnet"
    assert zoo.get_entry("timm:mobilenetv3_large_100").family == "mobilenetv3"
    assert zoo.get_entry("timm:convnext_atto").family == "generic"
    assert zoo.get_entry("timm:resnet50d").transfer_mult == (1.0,) * 5


def test_cli_prints_table_of_every_model():
    r = subprocess.run([sys.executable, "-m", "distill.zoo"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:6] == ["name", "arch", "params", "stages", "transfer", "detection"]
    for name, entry in zoo.ZOO.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert entry.arch in row
    r50 = next(line for line in lines if line.startswith("r50_vd "))
    assert "25.58M" in r50 and "0.1,0.1,0.2,0.2,0.3" in r50 and "layer1" in r50
