"""The shipped recipes load against the trainer's schema and say what the PaddleClas SSLD tables say."""
from pathlib import Path

import pytest

from distill import ssld
from distill.bench import bench, format_results
from distill.core.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def recipe(name):
    cfg = load_config(CONFIGS / name, [], ssld.DEFAULTS)
    ssld.check(cfg)
    return cfg


def test_r50_is_the_paddleclas_big_data_recipe():
    cfg = recipe("r50.yaml")
    assert (cfg.schedule.epochs, cfg.optim.lr, cfg.optim.base_batch, cfg.optim.weight_decay) == (360, 0.4, 1024, 7e-5)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.schedule.kind, cfg.schedule.warmup_epochs) == ("sgd", 0.9, "cosine", 5)
    assert cfg.student.arch == "r50_vd" and cfg.loss.kind == "ssld" and cfg.loss.hard_weight == 0
    assert cfg.teacher.models[0].startswith("timm:resnext101_32x16d") and cfg.teacher.bn == "train"
    assert cfg.data.augment == "random_crop" and cfg.data.input_size == 224 and cfg.data.hflip
    assert cfg.data.batch_size == 1024 and cfg.run.amp == "bf16"   # the global batch of PaddleClas's 32 cards


def test_r50_finetune_and_fix_stages_chain_from_the_previous_artifact():
    ft = recipe("r50_ft.yaml")
    assert (ft.schedule.epochs, ft.optim.lr, ft.student.init) == (60, 0.004, "r50_vd_ssld_stage1")
    assert [s["path"] for s in ft.data.train] == ["imagenet/train"]
    fix = recipe("r50_fix.yaml")
    assert fix.student.init == ft.export.name and fix.data.input_size == 320 and fix.data.augment == "test"
    assert fix.student.multipliers == [0.0] * 5 and fix.student.head_mult == 1.0


def test_mv3_recipe():
    cfg = recipe("mv3.yaml")
    assert (cfg.schedule.epochs, cfg.optim.lr, cfg.optim.base_batch, cfg.optim.weight_decay) == (360, 3.65625, 5760, 1e-5)
    assert cfg.student.arch == "mv3_large" and cfg.teacher.models == ["r50_vd_ssld"]


def test_funmatch_recipe_is_function_matching():
    cfg = recipe("funmatch.yaml")
    assert cfg.optim.name == "adamw" and cfg.data.augment == "inception" and cfg.data.function_matching
    assert cfg.schedule.epochs >= 1000 and cfg.optim.clip_grad_norm == 1.0


@pytest.mark.parametrize("name", ["demo_teacher.yaml", "demo.yaml", "demo_labels_only.yaml"])
def test_demo_chain_configs_validate(name):
    cfg = recipe(name)
    assert cfg.run.device == "cpu" and cfg.run.amp == "off"
    if name == "demo.yaml":
        assert cfg.loss.kind == "ssld" and len(cfg.data.train) == 2  # labeled + unlabeled pool


def test_bench_reports_both_loops_the_ratio_and_data_wait(demo_root):
    r = bench("timm:test_resnet", "timm:test_convnext", str(demo_root / "train"), batch=8, size=32, steps=2,
              warmup=1, workers=0, rounds=2, device="cpu")
    for loop in ("plain", "ssld_kit"):
        assert r[loop]["img_per_s"] > 0 and 0 <= r[loop]["data_wait_share"] < 1 and r[loop]["images"] == 16
    assert r["speedup"] == pytest.approx(r["ssld_kit"]["img_per_s"] / r["plain"]["img_per_s"])
    text = format_results(r)
    assert "speedup" in text and "data wait" in text and "CPU" in text
