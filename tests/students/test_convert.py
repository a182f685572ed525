"""PaddleClas import without paddle: the restricted .pdparams reader, the key mapping's errors, the CLI."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from distill.students.artifact import load_student, read_meta
from distill.convert import main
from distill.students.convert import MODULE_MAPS, ConversionError, convert_state_dict, get_paddle_arch
from distill.students.pdparams import PdparamsError, load_pdparams

REPO = Path(__file__).resolve().parents[2]


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pdparams_reader_refuses_a_pickle_that_calls_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(pickle.dumps({"w": _RunsShell(f"echo pwned > {marker}")}, protocol=4))

    with pytest.raises(PdparamsError, match=rf"refusing to load {os.system.__module__}\.system from evil\.pdparams"):
        load_pdparams(evil)
    assert not marker.exists()


def test_pdparams_reader_accepts_paddle_save_layouts(tmp_path):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    big = np.arange(12, dtype=np.float32).reshape(3, 4)
    # paddle.save: arrays + the internal-name table; Paddle 2.1 wrote (name, array) tuples; protocols < 4
    # split big arrays into `key@@.i` slices described under UnpackBigParamInfor@@.
    saved = {"conv.weight": w, "conv.bias": ("conv2d_0.b_0", b),
             "fc.weight@@.0": big.reshape(-1)[:8], "fc.weight@@.1": big.reshape(-1)[8:],
             "UnpackBigParamInfor@@": {"fc.weight": {"OriginShape": (3, 4),
                                                     "slices": ["fc.weight@@.0", "fc.weight@@.1"]}},
             "StructuredToParameterName@@": {"conv.weight": "conv2d_0.w_0"}}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pdparams"
        path.write_bytes(pickle.dumps(saved, protocol=protocol))
        state = load_pdparams(path)
        assert sorted(state) == ["conv.bias", "conv.weight", "fc.weight"]
        np.testing.assert_array_equal(state["conv.weight"], w)
        np.testing.assert_array_equal(state["conv.bias"], b)
        np.testing.assert_array_equal(state["fc.weight"], big)


def test_pdparams_reader_names_missing_and_non_pickle_files(tmp_path):
    with pytest.raises(PdparamsError, match="no such .pdparams file"):
        load_pdparams(tmp_path / "absent.pdparams")
    text = tmp_path / "notes.pdparams"
    text.write_text("not a pickle")
    with pytest.raises(PdparamsError, match="not a pickle"):
        load_pdparams(text)
    truncated = tmp_path / "cut.pdparams"
    truncated.write_bytes(pickle.dumps({"w": np.ones(100, np.float32)}, protocol=4)[:60])
    with pytest.raises(PdparamsError, match="could not be read"):
        load_pdparams(truncated)
    objects = tmp_path / "objects.pdparams"
    objects.write_bytes(pickle.dumps({"w": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises(PdparamsError, match="not a numeric array"):
        load_pdparams(objects)


def _paddle_state_from(model, arch_name):
    """The state dict PaddleClas would hold for `model`'s weights (inverse of the mapping under test)."""
    arch = get_paddle_arch(arch_name)
    inverse = {dst: src for src, dst in MODULE_MAPS[arch.family](model).items()}
    state = {}
    for key, value in model.state_dict().items():
        module, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            continue
        array = value.numpy().copy()
        if inverse[module] == arch.classifier and param == "weight":
            array = array.T / (1.0 - arch.inference_dropout)
        paddle_param = {"running_mean": "_mean", "running_var": "_variance"}.get(param, param)
        state[f"{inverse[module]}.{paddle_param}"] = array
    return state


@pytest.fixture(scope="module")
def mv3_small():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100_paddle", num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model


def test_mobilenetv3_classifier_absorbs_paddle_inference_dropout(mv3_small):
    state = _paddle_state_from(mv3_small, "mv3_small")
    converted = convert_state_dict(state, get_paddle_arch("mv3_small"), mv3_small)
    expected = mv3_small.state_dict()
    assert converted.keys() == expected.keys()
    torch.testing.assert_close(converted["classifier.weight"], torch.from_numpy(state["fc.weight"]).T * 0.8)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert converted[key].item() == 0  # Paddle has no counter
        else:
            torch.testing.assert_close(converted[key], value, rtol=1e-6, atol=1e-6)


def test_mapping_errors_name_every_unplaced_and_missing_tensor_with_shapes(mv3_small):
    state = _paddle_state_from(mv3_small, "mv3_small")
    del state["blocks.3.mid_se.conv1.weight"]
    state["blocks.2.mid_se.conv1.weight"] = np.zeros((8, 88, 1, 1), np.float32)  # block 2 has no SE
    state["conv.bn._variance"] = np.ones(17, np.float32)
    with pytest.raises(ConversionError) as err:
        convert_state_dict(state, get_paddle_arch("mv3_small"), mv3_small, "w.pdparams")
    message = str(err.value)
    assert "blocks.2.mid_se.conv1.weight (8, 88, 1, 1)" in message  # no place in the model
    assert "blocks.2.0.se.conv_reduce.weight (24, 96, 1, 1)" in message  # got no Paddle weight
    assert "conv.bn._variance (17,) -> bn1.running_var (16,)" in message


def test_resnet50_vd_maps_all_277_paddle_tensors_onto_resnet50d():
    model = timm.create_model("resnet50d", num_classes=1000)
    state = _paddle_state_from(model, "r50_vd")
    assert len(state) == 277 and sum(a.size for a in state.values()) == 25_629_512  # timm resnet50d == PaddleClas ResNet50_vd
    assert state["blocks.3.short.conv.weight"].shape == (512, 256, 1, 1)  # stage 2's avg-pool shortcut
    assert state["fc.weight"].shape == (2048, 1000)  # Paddle Linear is [in, out]
    converted = convert_state_dict(state, get_paddle_arch("r50_vd"), model)
    torch.testing.assert_close(converted["fc.weight"], model.fc.weight.detach())
    torch.testing.assert_close(converted["layer2.0.downsample.1.weight"], model.layer2[0].downsample[1].weight.detach())


@pytest.mark.parametrize("arch_name", ["r18_vd", "res2net50_vd_26w_4s", "mv1", "mv2", "mv3_large_x0_35",
                                       "pplcnet_x0_25", "hgnetv2_b0", "hgnetv2_b4"])
def test_every_family_map_places_each_paddle_tensor_once(arch_name):
    arch = get_paddle_arch(arch_name)
    torch.manual_seed(0)
    model = timm.create_model(arch.timm_arch, num_classes=10)
    state = _paddle_state_from(model, arch_name)  # raises KeyError if a model module has no Paddle name
    assert len(set(MODULE_MAPS[arch.family](model).values())) == len(MODULE_MAPS[arch.family](model))
    converted = convert_state_dict(state, arch, model)
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(converted[key], value, rtol=1e-6, atol=1e-6)


def test_pphgnetv2_file_loads_into_timms_own_hgnetv2_unchanged():
    ours = timm.create_model("hgnetv2_b1_paddle", num_classes=10)
    state = convert_state_dict(_paddle_state_from(ours, "hgnetv2_b1"), get_paddle_arch("hgnetv2_b1"), ours)
    theirs = timm.create_model("hgnetv2_b1", num_classes=10)
    theirs.load_state_dict(state, strict=True)  # same names and shapes: only the stem pool's padding differs
    assert type(ours.stem).__name__ == "PaddleStemV2" and type(theirs.stem).__name__ == "StemV2"


def test_unknown_arch_lists_the_supported_ones():
    with pytest.raises(ConversionError, match=r"unknown --arch 'r51_vd'; supported: r18_vd \(ResNet18_vd\)"):
        get_paddle_arch("r51_vd")
    assert get_paddle_arch("MobileNetV3_large_x1_0").timm_arch == "mobilenetv3_large_100_paddle"


def test_convert_cli_writes_a_loadable_student(mv3_small, tmp_path):
    weights = tmp_path / "MobileNetV3_small_x1_0_pretrained.pdparams"
    weights.write_bytes(pickle.dumps(_paddle_state_from(mv3_small, "mv3_small"), protocol=4))
    out = tmp_path / "mv3_small_ssld.safetensors"

    main([str(weights), "--arch", "mv3_small", "-o", str(out)])

    meta = read_meta(out)
    assert meta["arch"] == "mobilenetv3_small_100_paddle" and meta["num_classes"] == 10
    assert meta["pretrain"]["source"] == "PaddleClas" and meta["pretrain"]["file"] == weights.name
    assert meta["preprocessing"]["input_size"] == 224 and meta["preprocessing"]["crop_pct"] == 0.875
    assert meta["preprocessing"]["interpolation"] == "bilinear"
    model, _ = load_student(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), mv3_small(x), rtol=1e-5, atol=1e-5)


def test_convert_cli_reports_a_missing_file_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "distill.convert", str(tmp_path / "nope.pdparams"),
                             "--arch", "r50_vd", "-o", str(tmp_path / "out.safetensors")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no such .pdparams file" in result.stderr and "nope.pdparams" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
