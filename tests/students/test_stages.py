import math

import pytest
import torch

from distill.students import zoo
from distill.core.errors import UserError
from distill.core.schedule import build_scheduler
from distill.students.stages import HEAD, param_stages, parse_multipliers, stage_param_groups

MULT = [0.1, 0.2, 0.3, 0.4, 0.5]  # distinct values so a wrong group shows up as a wrong lr


def group_of(groups):
    return {n: g for g in groups for n in g["names"]}


def test_every_r50_vd_parameter_lands_in_paddleclas_stage():
    model = zoo.create_model("r50_vd", num_classes=10)
    groups = group_of(stage_param_groups(model, MULT, lr=1.0, weight_decay=7e-5, family="resnet"))
    # Independent rule, by top-level module: stem convs + bn -> 0, layerN -> N, fc -> head (1.0).
    expected_mult = {"conv1": MULT[0], "bn1": MULT[0], "layer1": MULT[1], "layer2": MULT[2], "layer3": MULT[3],
                     "layer4": MULT[4], "fc": 1.0}
    names = [n for n, _ in model.named_parameters()]
    assert sorted(groups) == sorted(names)  # every parameter exactly once
    for name in names:
        g = groups[name]
        assert g["lr"] == pytest.approx(expected_mult[name.split(".")[0]]), name
        assert g["weight_decay"] == 7e-5, name  # BN included: PaddleClas decays BN in ResNet_vd
    assert sum(1 for n in names if n.startswith(("conv1", "bn1"))) == 9  # 3 stem convs + 3 BN (w, b)
    assert any("downsample" in n and groups[n]["lr"] == pytest.approx(MULT[2]) for n in names if n.startswith("layer2"))


MV3_LARGE_STAGES = {  # PaddleDetection blocks 0-2, 3-5, 6-8, 9-11, 12-14 (+ the 960 conv), in timm's nesting
    0: ["conv_stem", "bn1", "blocks.0.0", "blocks.1.0", "blocks.1.1"],
    1: ["blocks.2.0", "blocks.2.1", "blocks.2.2"],
    2: ["blocks.3.0", "blocks.3.1", "blocks.3.2"],
    3: ["blocks.3.3", "blocks.4.0", "blocks.4.1"],
    4: ["blocks.5.0", "blocks.5.1", "blocks.5.2", "blocks.6.0"],
}


def _mv3_stage(name, table):
    for stage, prefixes in table.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return stage
    return HEAD


@pytest.mark.parametrize("arch", ["mobilenetv3_large_100", "mobilenetv3_large_100_paddle",
                                  "mobilenetv3_large_075_paddle"])
def test_every_mv3_large_parameter_lands_in_paddledetection_stage(arch):
    import timm
    model = timm.create_model(arch, num_classes=10)
    groups = group_of(stage_param_groups(model, MULT, lr=1.0, weight_decay=1e-5, family="mobilenetv3"))
    bn = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
          for p, _ in mod.named_parameters(recurse=False)}
    names = [n for n, _ in model.named_parameters()]
    assert sorted(groups) == sorted(names)
    assert bn and any(".se." in n for n in names)
    for name in names:
        stage = _mv3_stage(name, MV3_LARGE_STAGES)
        g = groups[name]
        assert g["lr"] == pytest.approx(1.0 if stage is HEAD else MULT[stage]), name  # BN and SE included
        assert g["weight_decay"] == (0.0 if name in bn else 1e-5), name  # PaddleDetection: norm_decay 0
    assert {n.split(".")[0] for n in names if _mv3_stage(n, MV3_LARGE_STAGES) is HEAD} == {"conv_head", "classifier"}


def test_mv3_small_groups_blocks_by_three_and_leaves_stage_4_empty():
    model = zoo.create_model("mv3_small", num_classes=10)
    stages = param_stages(model, "mobilenetv3")
    flat = [f"blocks.{i}.{j}" for i, s in enumerate(model.blocks) for j in range(len(s))]
    assert len(flat) == 12  # 11 inverted-residual blocks + the 576 conv
    for k, prefix in enumerate(flat):
        got = {stages[n] for n in stages if n.startswith(prefix + ".")}
        assert got == {min(k // 3, 4)}, prefix  # the 576 conv (k = 11) lands in 3, as PaddleDetection's extra conv
    assert 4 not in stages.values()


def test_lcnet_and_hgnetv2_stage_rules():
    lcnet = param_stages(zoo.create_model("pplcnet_x0_25", num_classes=10), "lcnet")
    assert lcnet["conv_stem.weight"] == lcnet["blocks.0.0.conv_dw.weight"] == 0  # conv1 + blocks2
    assert lcnet["blocks.3.0.conv_dw.weight"] == lcnet["blocks.4.3.conv_pw.weight"] == 3  # blocks5
    assert lcnet["blocks.5.1.se.conv_reduce.weight"] == 4 and lcnet["conv_head.weight"] is HEAD
    model = zoo.create_model("hgnetv2_b0", num_classes=10)
    hg = param_stages(model, "hgnetv2")
    assert hg["stem.stem1.conv.weight"] == 0 and hg["stages.2.blocks.0.layers.0.conv1.conv.weight"] == 3
    assert hg["head.fc.weight"] is HEAD
    groups = group_of(stage_param_groups(model, MULT, lr=1.0, weight_decay=1e-5, family="hgnetv2"))
    assert groups["stages.0.blocks.0.layers.0.lab.scale"]["lr"] == pytest.approx(MULT[1] * 0.01)
    assert groups["stages.0.blocks.0.layers.0.bn.weight"]["weight_decay"] == 0.0


def test_generic_rule_covers_any_timm_model_in_order():
    model = zoo.create_model("timm:vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    stages = param_stages(model, "generic")
    assert stages["patch_embed.proj.weight"] == 0
    assert stages["head.weight"] is HEAD
    order = [stages[f"blocks.{i}.attn.qkv.weight"] for i in range(12)]
    assert order == sorted(order) and order[0] == 1 and order[-1] == 4  # monotone, spans stages 1..4
    groups = stage_param_groups(model, [1, 1, 1, 1, 1], 0.1, 0.05, family="generic")
    decay_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay_of["blocks.0.norm1.weight"] == 0.0 and decay_of["blocks.0.attn.qkv.bias"] == 0.0
    assert decay_of["blocks.0.attn.qkv.weight"] == 0.05


def test_zero_multiplier_freezes_stage():
    model = zoo.create_model("r18_vd", num_classes=10)
    groups = stage_param_groups(model, [0, 1, 1, 1, 1], 0.1, 1e-4, family="resnet")
    grouped = {n for g in groups for n in g["names"]}
    for name, p in model.named_parameters():
        frozen = name.startswith(("conv1.", "bn1."))
        assert p.requires_grad is not frozen, name
        assert (name in grouped) is not frozen, name


@pytest.mark.parametrize("bad, msg", [([1, 1, 1, 1], "wrong length"), ("0.1,0.2", "wrong length"),
                                      ([1, 1, -0.1, 1, 1], "negative"), ([1, "a", 1, 1, 1], "not a number"),
                                      ([1, True, 1, 1, 1], "not a number"), ("1,1,1,1,nan", "not finite")])
def test_bad_multiplier_lists_name_the_layout(bad, msg):
    with pytest.raises(UserError, match=msg) as e:
        parse_multipliers(bad, "resnet")
    assert "stem, stage1, stage2, stage3, stage4" in str(e.value)


def test_string_multipliers_parse():
    assert parse_multipliers("0.1, 0.1,0.2,0.2,0.3") == [0.1, 0.1, 0.2, 0.2, 0.3]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_warmup_cosine_keeps_multiplier_ratios(opt_cls):
    model = zoo.create_model("r18_vd", num_classes=10)
    groups = stage_param_groups(model, MULT, lr=0.4, weight_decay=1e-4, head_mult=2.0, family="resnet")
    opt = opt_cls(groups, lr=0.4)
    total, warmup = 20, 5
    sched = build_scheduler(opt, "cosine", total_steps=total, warmup_steps=warmup, warmup_factor=0.0)
    for step in range(total):
        # independent formula: linear ramp, then half-cosine
        f = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(0.4 * g["lr_mult"] * f, abs=1e-12)
        opt.step()
        sched.step()


def test_step_schedule_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "step", total_steps=100, warmup_steps=10, milestones=[50, 80], warmup_factor=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55) and lrs[10] == pytest.approx(1.0)
    assert lrs[49] == pytest.approx(1.0) and lrs[50] == pytest.approx(0.1) and lrs[80] == pytest.approx(0.01)
