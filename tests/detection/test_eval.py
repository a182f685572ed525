"""COCO box metrics: faster-coco-eval gives pycocotools' numbers on the same detections; crowd regions."""
import copy
import json

import numpy as np
import pytest
import torch

from detection.coco_eval import METRICS, coco_box_metrics, to_coco_results


def noisy_detections(gt: dict, seed=0) -> list[dict]:
    """Jittered true boxes with random scores and sometimes the wrong class, plus false positives."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    out = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(rng.integers(1, 3)):
            j = rng.normal(0, 0.12, 4) * [w, h, w, h]
            cat = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(cats))
            out.append(dict(image_id=ann["image_id"], category_id=cat, bbox=[x + j[0], y + j[1], w + j[2], h + j[3]],
                            score=float(rng.random())))
    for img in gt["images"]:
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, img["width"] - 10, 2)
            out.append(dict(image_id=img["id"], category_id=int(rng.choice(cats)),
                            bbox=[x, y, *rng.uniform(5, 30, 2)], score=float(rng.random())))
    return out


@pytest.fixture
def val_gt(demo_root):
    return json.loads((demo_root / "annotations" / "instances_val.json").read_text())


def test_faster_coco_eval_equals_pycocotools_on_the_same_detections(tmp_path, val_gt):
    gt = copy.deepcopy(val_gt)
    gt["annotations"][0]["iscrowd"] = 1          # crowd handling must agree too
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    dets = noisy_detections(gt)
    fast = coco_box_metrics(path, dets, "faster")
    oracle = coco_box_metrics(path, dets, "pycocotools")
    assert list(fast) == list(METRICS)
    for k in METRICS:
        assert fast[k] == pytest.approx(oracle[k], abs=1e-9), k
    assert 5 < fast["AP"] < 95                    # a non-trivial case, not all zeros or perfect


def test_detection_on_a_crowd_region_is_not_a_false_positive(tmp_path, val_gt):
    gt = copy.deepcopy(val_gt)
    crowd = dict(gt["annotations"][0], id=10**6, iscrowd=1)
    gt["annotations"].append(crowd)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    perfect = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.5)
               for a in val_gt["annotations"]]
    on_crowd = dict(image_id=crowd["image_id"], category_id=crowd["category_id"], bbox=crowd["bbox"], score=0.9)
    assert coco_box_metrics(path, perfect)["AP"] == pytest.approx(100.0)
    assert coco_box_metrics(path, perfect + [on_crowd])["AP"] == pytest.approx(100.0)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(val_gt))                      # without the crowd mark it costs precision
    duplicate = dict(on_crowd, bbox=[v + 0.5 for v in crowd["bbox"]])
    assert coco_box_metrics(plain, perfect + [duplicate])["AP"] < 100.0


def test_model_outputs_become_coco_results_with_category_ids():
    det = dict(boxes=torch.tensor([[10.0, 20.0, 40.0, 60.0]]), scores=torch.tensor([0.75]), labels=torch.tensor([2]))
    assert to_coco_results([det], [7], category_ids=[5, 9]) == [
        dict(image_id=7, category_id=9, bbox=[10.0, 20.0, 30.0, 40.0], score=0.75)]


def test_no_detections_score_zero(val_gt, demo_root):
    assert coco_box_metrics(demo_root / "annotations" / "instances_val.json", []) == {k: 0.0 for k in METRICS}


@pytest.mark.parametrize("flag, value, allowed", [("--batch-size", "-1", "an integer >= 1"),
                                                  ("--workers", "-2", "an integer >= 0")])
def test_eval_flags_out_of_range_are_one_line_before_loading_anything(tmp_path, capsys, flag, value, allowed):
    from detection.eval import main
    from distill.core.errors import run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--checkpoint", str(tmp_path / "missing.pt"), flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: argument {flag}: expected {allowed}, got {value}")
