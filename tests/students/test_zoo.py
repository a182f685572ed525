import subprocess
import sys

import pytest

from distill.students import zoo
from distill.core.errors import UserError


def test_r50_vd_is_resnet50d_with_paddleclas_tensor_count():
    model = zoo.create_model("r50_vd", num_classes=1000)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 277 and sum(v.numel() for v in state.values()) == 25_629_512  # timm resnet50d == PaddleClas ResNet50_vd


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


def test_every_convertible_paddleclas_model_has_a_zoo_row_with_its_arch():
    from distill.students.convert import PADDLE_ARCHS

    for arch in PADDLE_ARCHS.values():
        entry = zoo.get_entry(arch.name)
        assert (entry.arch, entry.paddle_name) == (arch.timm_arch, arch.paddle_name), arch.name
    assert {"r18_vd", "mv3_small_x0_35", "pplcnet_x2_5", "hgnetv2_b6", "res2net200_vd_26w_4s"} <= set(PADDLE_ARCHS)


def test_every_zoo_row_builds_and_fills_its_stages():
    import torch

    from distill.students.stages import LAYOUT_HELP, param_stages

    for entry in zoo.ZOO.values():
        assert entry.family in LAYOUT_HELP, entry.name
        with torch.device("meta"):
            model = zoo.create_model(entry.name, num_classes=10)
        used = set(param_stages(model, entry.family).values())
        # PaddleDetection's rule leaves MobileNetV3-small's entry [4] empty; every other layout uses all five
        expected = {0, 1, 2, 3, None} if entry.name.startswith("mv3_small") else {0, 1, 2, 3, 4, None}
        assert used == expected, entry.name


def test_distilled_students_default_to_reduced_multipliers_and_the_teacher_to_plain():
    assert zoo.get_entry("mv3_large_x0_35").transfer_mult == zoo.MOBILE
    assert zoo.get_entry("pplcnet_x1_0").detection_mult == zoo.MOBILE
    assert zoo.get_entry("res2net101_vd_26w_4s").detection_mult == zoo.RESNET_DETECTION
    assert zoo.get_entry("resnext101_32x16d_wsl").transfer_mult == zoo.PLAIN
    assert zoo.get_entry("timm:lcnet_100").family == "lcnet" and zoo.get_entry("timm:hgnetv2_b2").family == "hgnetv2"
