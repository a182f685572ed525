"""Matched decay reuses a coupled L2 as is, refuses a decoupled (AdamW) value, and says where the number came from."""
import pytest

from distill.core.errors import UserError
from distill.students.artifact import build_meta
from distill.students.decay import DEFAULT_WEIGHT_DECAY, decay_kind, matched_weight_decay, weight_decay_for
from distill.students.download import PUBLISHED, published_pretrain


def meta(**pretrain):
    return {"name": "s", "pretrain": pretrain}


def test_coupled_l2_is_reused_with_its_source():
    value, note = matched_weight_decay(meta(weight_decay=7e-5, weight_decay_kind="coupled",
                                            weight_decay_source="recipe"))
    assert value == 7e-5 and "matched" in note and "coupled" in note and "recipe" in note


def test_decoupled_decay_is_refused_with_the_flag_to_pass():
    with pytest.raises(UserError) as e:
        matched_weight_decay(meta(weight_decay=0.05, weight_decay_kind="decoupled", optimizer="adamw"),
                             flag="--weight-decay")
    msg = str(e.value)
    assert "decoupled" in msg and "0.05" in msg and "--weight-decay" in msg and "\n" not in msg


def test_no_recorded_decay_gives_the_default_and_says_so():
    value, note = matched_weight_decay(meta(weight_decay=None))
    assert value == DEFAULT_WEIGHT_DECAY == 1e-4 and "default" in note and "records no" in note
    assert matched_weight_decay(build_meta("r18_vd", 10))[0] == 1e-4


def test_artifacts_without_a_kind_are_judged_by_their_optimizer():
    assert decay_kind(dict(weight_decay=3e-5, optimizer="sgd")) == "coupled"
    assert matched_weight_decay(meta(weight_decay=3e-5, optimizer="sgd"))[0] == 3e-5
    with pytest.raises(UserError, match="decoupled weight decay 0.05"):  # the old demo artifact: AdamW 0.05
        matched_weight_decay(meta(weight_decay=0.05, optimizer="adamw"))
    value, note = matched_weight_decay(meta(weight_decay=3e-5))  # no kind, no optimizer: not reused
    assert value == 1e-4 and "not reused" in note
    with pytest.raises(UserError, match="weight_decay_kind"):
        decay_kind(dict(weight_decay=1e-4, weight_decay_kind="l2"))


def test_published_paddleclas_students_carry_their_l2_and_detection_uses_it():
    r50 = {"name": "r50_vd_ssld", "pretrain": published_pretrain(PUBLISHED["r50_vd_ssld"])}
    assert r50["pretrain"]["weight_decay_kind"] == "coupled" and r50["pretrain"]["epochs"] == 420
    assert r50["pretrain"]["top1"] == 83.0 and any("2e-5" in n for n in r50["pretrain"]["notes"])  # disagreement
    value, note = weight_decay_for(None, r50, flag="-o optim.weight_decay=VALUE")   # what detection.train does
    assert value == 7e-5 and "7e-05: matched" in note
    assert weight_decay_for(3e-4, r50) == (3e-4, "0.0003 (given)")                   # a given value wins
    mv3 = {"pretrain": published_pretrain(PUBLISHED["mv3_large_ssld"])}
    assert weight_decay_for(None, mv3)[0] == 1e-5 and mv3["pretrain"]["top1"] == 78.96
    with pytest.raises(UserError, match="optim.weight_decay"):
        weight_decay_for(None, meta(weight_decay=0.05, weight_decay_kind="decoupled"), flag="-o optim.weight_decay=V")
