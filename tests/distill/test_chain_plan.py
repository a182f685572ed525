"""The chain's plan, without training: the default rules, the teacher decision, -o STEP.KEY=VALUE, and the
settings-changed warning."""
import json

import pytest

from distill.chain import __main__ as chain
from distill.chain import defaults as d
from distill.core.errors import UserError
from helpers import FRUIT, make_artifact, make_named_artifact


@pytest.mark.parametrize("n_train, batch", [(24, 8), (300, 8), (500, 16), (1438, 32), (12_000, 64)])
def test_batch_is_train_over_30_as_a_power_of_two_within_8_to_64(n_train, batch):
    assert d.batch_size(n_train)[0] == batch


def test_epochs_aim_at_a_step_budget_by_init_within_bounds():
    assert d.epochs(1438, 32, pretrained=False)[0] == 45        # 45 steps per epoch: 2000 steps
    assert d.epochs(1438, 32, pretrained=True)[0] == 14                                 # 600 steps
    assert d.epochs(20, 8, pretrained=False)[0] == 200 and d.epochs(10 ** 7, 64, True)[0] == 5
    assert "random init" in d.epochs(1438, 32, False)[1] and "fine-tuning" in d.epochs(1438, 32, True)[1]


def test_learning_rate_depends_on_the_optimizer_and_the_init_and_scales_with_the_batch():
    assert d.learning_rate("sgd", False, 256)[0] == pytest.approx(0.1)
    assert d.learning_rate("sgd", False, 32)[0] == pytest.approx(0.0125)
    assert d.learning_rate("sgd", True, 64)[0] == pytest.approx(0.01)
    assert d.learning_rate("adamw", False, 256)[0] == pytest.approx(1e-3)
    assert d.learning_rate("adamw", True, 128)[0] == pytest.approx(5e-5)
    assert "Goyal" in d.learning_rate("sgd", False, 32)[1]


def test_k_is_twice_the_labels_per_class_capped_by_the_pool():
    counts = {c: 30 for c in "abcdefghij"}
    assert d.mining_k(counts, None)[0] == 60
    k, why = d.mining_k(counts, 1000)             # 1000 / 10 / 2 = 50 < 60
    assert k == 50 and "capped at half the pool's share" in why
    assert d.mining_k(counts, 3)[0] == 1


def test_teacher_is_used_as_given_only_when_it_predicts_the_data_classes(tmp_path):
    named = make_named_artifact(tmp_path / "fruit.safetensors")
    finetune, why = chain.teacher_decision(str(named), list(FRUIT), "auto", False)
    assert not finetune and why == "its 8 class names are DATA's, in order"
    finetune, why = chain.teacher_decision(str(named), sorted(FRUIT), "auto", False)   # same names, other order
    assert finetune and "differ from DATA's" in why
    assert chain.teacher_decision(str(named), list(FRUIT), "yes", False)[0]
    with pytest.raises(UserError, match="trained on other classes.*drop --teacher-finetune no"):
        chain.teacher_decision(str(named), ["cat", "dog"], "no", False)
    unnamed = make_artifact(tmp_path / "unnamed.safetensors", num_classes=2)
    finetune, why = chain.teacher_decision(str(unnamed), ["cat", "dog"], "auto", False)
    assert not finetune and "records no class names" in why and "assumed" in why
    assert chain.teacher_decision("timm:test_resnet", ["cat", "dog"], "auto", False)[0]


def test_step_overrides_go_to_their_step_and_a_bad_one_names_the_grammar():
    split = chain.split_passthrough(["ssld.optim.lr=0.1", "students.schedule.epochs=3", "dedup.cos=0.9"])
    assert split["ssld"] == ["optim.lr=0.1"] and split["students"] == ["schedule.epochs=3"]
    assert split["dedup"] == ["cos=0.9"] and split["teacher"] == []
    for bad in ("optim.lr=0.1", "nowhere.x=1", "ssld.optim.lr"):
        with pytest.raises(UserError, match="STEP.KEY=VALUE"):
            chain.split_passthrough([bad])


def test_a_changed_setting_is_named_against_the_previous_plan(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(dict(settings=dict(epochs=dict(value=8), k=dict(value=60)))))
    now = dict(settings=dict(epochs=dict(value=10), k=dict(value=60), lr=dict(value=0.1)))
    assert chain.changed_settings(path, now) == "epochs 8 -> 10"
    assert chain.changed_settings(tmp_path / "none.json", now) == ""


def test_unbalanced_classes_add_mean_per_class_to_the_report():
    from pathlib import Path

    from distill.chain.data import ChainData
    from distill.chain.report import accuracy_table
    assert not ChainData(Path("d"), ["a", "b"], dict(a=10, b=12), dict(a=5, b=5), "val").unbalanced
    assert ChainData(Path("d"), ["a", "b"], dict(a=10, b=30), dict(a=5, b=5), "val").unbalanced
    row = dict(arch="x", top1=90.0, top1_test=80.0, top1_fix_train=None, top1_fix=None, mean_per_class=70.0,
               train_size=32, test_size=36)
    r = dict(accuracy=dict(teacher=row, baseline=row, ssld=row))
    header = accuracy_table(r, dict(unbalanced=True))[0]
    assert header.endswith("| mean per-class |") and "70.00" in accuracy_table(r, dict(unbalanced=True))[2]
    assert "mean per-class" not in accuracy_table(r, dict(unbalanced=False))[0]
