"""Per-parameter learning rates and decay match the Paddle code each stage family follows, read off the real
packages: every trainable Paddle parameter's ParamAttr learning rate and L2 regularizer, mapped onto our
parameter through the converter's module map, against our optimizer group.

Needs the test extra (paddlepaddle, paddleclas, and paddledet 2.6.0 installed with --no-deps for
PaddleDetection's MobileNetV3). Skipped where they are absent, except under CI (CI=true).
"""
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

from distill.students import zoo
from distill.students.convert import MODULE_MAPS, PARAM_NAMES
from distill.students.stages import stage_param_groups

if os.environ.get("CI"):
    import paddle  # CI installs the test extra: a missing paddle must fail, not skip
else:
    paddle = pytest.importorskip("paddle", reason="needs the test extra (paddlepaddle, paddleclas, paddledet)")

MULT = [0.1, 0.2, 0.3, 0.4, 0.5]  # distinct, so a parameter in the wrong stage shows a wrong lr
WD = 3e-5


def _ppdet_mobilenet_v3():
    """PaddleDetection's backbone module, imported without ppdet/__init__ (which pulls in its whole data,
    metrics and engine stack, and their dependencies: pandas, pycocotools, ...); the file is unchanged."""
    target = "ppdet.modeling.backbones.mobilenet_v3"
    if target in sys.modules:
        return sys.modules[target]
    spec = importlib.util.find_spec("ppdet")
    if spec is None:
        if os.environ.get("CI"):
            raise ImportError("CI needs paddledet==2.6.0 (pip install --no-deps paddledet==2.6.0)")
        pytest.skip("needs paddledet 2.6.0 (pip install --no-deps paddledet==2.6.0)")
    root = Path(spec.origin).parent
    packages = (("ppdet", ""), ("ppdet.modeling", "modeling"), ("ppdet.modeling.backbones", "modeling/backbones"))
    for name, sub in packages:
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root / sub)]
            sys.modules[name] = package
    return importlib.import_module(target)


def _paddle_rules(layer, rename=lambda name: name):
    """{our-side Paddle name: (lr multiplier, decay)} for every trainable parameter; decay None = global."""
    rules = {}
    for name, p in layer.named_parameters():
        if p.stop_gradient or name.endswith(("._mean", "._variance")):
            continue
        reg = p.regularizer
        decay = None if reg is None else float(getattr(reg, "_coeff", getattr(reg, "_regularization_coeff", 0.0)))
        renamed = rename(name)
        if renamed is not None:
            rules[renamed] = (float(p.optimize_attr["learning_rate"]), decay)
    return rules


def _compare(rules, modules, model, family, expect_head=()):
    """Every Paddle rule reaches one of our parameters with the same lr and decay; ours are all covered."""
    groups = stage_param_groups(model, MULT, lr=1.0, weight_decay=WD, family=family)
    ours = {n: (g["lr_mult"], g["weight_decay"]) for g in groups for n in g["names"]}
    covered = set()
    for name, (lr, decay) in rules.items():
        module, _, param = name.rpartition(".")
        dst = f"{modules[module]}.{PARAM_NAMES[param]}"
        assert dst in ours, f"{name} -> {dst} is not one of our parameters"
        assert ours[dst][0] == pytest.approx(lr), f"{name} -> {dst}: lr {ours[dst][0]} vs Paddle {lr}"
        assert ours[dst][1] == pytest.approx(WD if decay is None else decay), f"{name} -> {dst}: decay"
        covered.add(dst)
    uncovered = {n.split(".")[0] for n in set(ours) - covered}
    assert uncovered == set(expect_head), uncovered  # what the Paddle model lacks: only the named head parts
    return ours


@pytest.mark.parametrize("size,scale", [("large", 1.0), ("small", 1.0), ("small", 0.5)])
def test_mobilenetv3_multipliers_match_paddledetection(size, scale):
    mv3 = _ppdet_mobilenet_v3()
    blocks = 15 if size == "large" else 11
    with paddle.utils.unique_name.guard():
        # with_extra_blocks builds the 960/576 conv as conv{blocks + 2}; its further SSD blocks we ignore
        net = mv3.MobileNetV3(scale=scale, model_name=size, lr_mult_list=MULT, conv_decay=WD, norm_decay=0.0,
                              with_extra_blocks=True, feature_maps=[blocks + 2])

    def to_paddleclas(name):
        stage, _, rest = name.partition(".")
        index = int(stage[len("conv"):]) - 2
        if index == -1:
            return f"conv.{rest}"
        if index < blocks:
            return f"blocks.{index}.{rest}"
        return f"last_second_conv.{rest}" if index == blocks else None

    rules = _paddle_rules(net, to_paddleclas)
    tag = {0.5: "050", 1.0: "100"}[scale]
    model = zoo.create_model(f"timm:mobilenetv3_{size}_{tag}_paddle", num_classes=10)
    ours = _compare(rules, MODULE_MAPS["mobilenetv3"](model), model, "mobilenetv3",
                    expect_head=("conv_head", "classifier"))
    # the facts the rule rests on, stated once more by hand
    assert rules["conv.bn.weight"] == (MULT[0], 0.0) and rules["blocks.2.expand_conv.conv.weight"] == (MULT[0], WD)
    assert rules["blocks.3.linear_conv.bn.bias"] == (MULT[1], 0.0)
    assert rules["last_second_conv.conv.weight"][0] == (MULT[4] if size == "large" else MULT[3])
    assert ours["classifier.weight"] == (1.0, WD)


def _paddleclas(module, name, **kwargs):
    mod = importlib.import_module(f"paddleclas.ppcls.arch.backbone.legendary_models.{module}")
    with paddle.utils.unique_name.guard():
        return getattr(mod, name)(**kwargs)


def test_pplcnet_multipliers_match_paddleclas():
    layer = _paddleclas("pp_lcnet", "PPLCNet_x1_0", lr_mult_list=[MULT[0]] + MULT)  # conv1 and blocks2 share [0]
    model = zoo.create_model("pplcnet_x1_0", num_classes=10)
    ours = _compare(_paddle_rules(layer), MODULE_MAPS["lcnet"](model), model, "lcnet")
    assert ours["bn1.weight"] == (MULT[0], 0.0) and ours["blocks.5.1.se.conv_reduce.weight"] == (MULT[4], WD)


def test_pphgnetv2_multipliers_match_paddleclas_including_lab_lr():
    layer = _paddleclas("pp_hgnet_v2", "PPHGNetV2_B0", lr_mult_list=MULT)
    model = zoo.create_model("hgnetv2_b0", num_classes=10)
    ours = _compare(_paddle_rules(layer), MODULE_MAPS["hgnetv2"](model), model, "hgnetv2")
    assert ours["stem.stem1.lab.scale"] == (pytest.approx(MULT[0] * 0.01), WD)
    assert ours["stages.3.blocks.0.aggregation.1.bn.bias"] == (MULT[4], 0.0)


def test_resnet18_vd_multipliers_match_paddleclas():
    layer = _paddleclas("resnet", "ResNet18_vd", lr_mult_list=MULT)
    model = zoo.create_model("r18_vd", num_classes=10)
    ours = _compare(_paddle_rules(layer), MODULE_MAPS["resnet_vd"](model), model, "resnet")
    assert ours["layer1.0.downsample.2.weight"] == (MULT[1], WD)  # the stage-1 projection, BN decayed
