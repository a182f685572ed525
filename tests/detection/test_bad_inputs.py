"""detection.eval, detection.predict and detection.train over bad files and values: one `error:` line,
exit 2, never a traceback (the machinery and the shared tests: tests/bad_inputs.py)."""
import copy
import json

import torch

from bad_inputs import REPO, UNWRITABLE, BadFiles, Row, assert_zygote_matches_a_real_subprocess, \
    catalogue_fixture, row_test
from bad_inputs import test_catalogue_is_consistent, test_rows_fail_fast  # noqa: F401  (run on this catalogue)


def _coco(demo_root, name="instances_val.json"):
    return json.loads((demo_root / "annotations" / name).read_text())


def coco_files(f: BadFiles) -> dict:
    """The demo's val annotations, each broken in one way."""
    coco = _coco(f.demo_root)

    def coco_file(name, change):
        data = copy.deepcopy(coco)
        change(data)
        return f.write(name, json.dumps(data))
    bbox = lambda value: lambda d: d["annotations"][0].__setitem__("bbox", value)
    return dict(
        not_json=f.write("not_json.json", '{"images": [1, 2,'),
        no_lists=coco_file("no_lists.json", lambda d: d.pop("annotations")),
        bad_bbox=coco_file("bad_bbox.json", bbox([1, 2, "x", 4])),
        neg_box=coco_file("neg_box.json", bbox([1, 2, -5, 4])),
        all_crowd=coco_file("all_crowd.json", lambda d: [a.__setitem__("iscrowd", 1) for a in d["annotations"]]),
        unknown_cat=coco_file("unknown_cat.json", lambda d: d["annotations"][0].__setitem__("category_id", 77)),
        dup_image=coco_file("dup_image.json", lambda d: d["images"].append(dict(d["images"][0]))),
        missing_file=coco_file("missing_file.json",
                               lambda d: d["images"][0].__setitem__("file_name", "val/nope.jpg")),
        other_cats=coco_file("other_cats.json", lambda d: d["categories"].append(dict(id=99, name="extra"))),
        bomb=coco_file("bomb.json", lambda d: d["images"][0].__setitem__("file_name", str(f.bomb))),
    )


def detection_checkpoint(path, demo_root):
    """A real (untrained) detection checkpoint, in the format detection.train writes, so that eval and
    predict rows fail on the bad input they are given and not on the checkpoint."""
    from detection.config import DEFAULTS
    from detection.model import build_detector
    from distill.core.checkpoint import save_checkpoint
    from distill.students.artifact import load_student
    torch.manual_seed(0)
    trunk, meta = load_student("timm:test_resnet")
    cfg = copy.deepcopy(DEFAULTS["model"])
    cfg.update(arch="faster", backbone="timm:test_resnet", fpn_channels=8, box_head_dim=16, train_sizes=[64],
               test_size=64, max_size=64, rpn_post_nms_train=20, roi_batch_per_image=16)
    model = build_detector(cfg, 4, trunk, meta)
    coco = _coco(demo_root)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    data = dict(DEFAULTS.get("data", {}), val_json=str(demo_root / "annotations" / "instances_val.json"),
                val_images=str(demo_root))
    save_checkpoint(path, dict(model=model.state_dict(), model_config=cfg, backbone_meta=meta,
                               classes=[c["name"] for c in cats], category_ids=[c["id"] for c in cats],
                               config=dict(data=data)))
    return path


def eval_rows(f: BadFiles, coco: dict, detector) -> list[Row]:
    root, demo_root = f.root, f.demo_root
    ckpt = ["--checkpoint", str(detector), "--device", "cpu", "--workers", "0"]
    val = lambda p: [*ckpt, "--val-json", str(p), "--val-images", str(demo_root)]
    good = demo_root / "annotations" / "instances_val.json"
    return [
        Row("eval-batch-size-negative", "detection.eval", [*ckpt, "--batch-size", "-1"], "argument --batch-size"),
        Row("eval-good-inputs-control", "detection.eval", val(good), "AP50", kind="ok"),
        Row("eval-missing-checkpoint", "detection.eval", ["--checkpoint", str(root / "nope.pt")], "nope.pt"),
        Row("eval-hostile-checkpoint", "detection.eval", ["--checkpoint", str(f.hostile_pt)], "hostile.pt"),
        Row("eval-truncated-checkpoint", "detection.eval", ["--checkpoint", str(f.truncated_pt)], "truncated.pt"),
        Row("eval-foreign-checkpoint", "detection.eval", ["--checkpoint", str(f.foreign_pt)], "foreign.pt"),
        Row("eval-classifier-checkpoint", "detection.eval", ["--checkpoint", str(f.good_pt)],
            "is not a detection checkpoint"),
        Row("eval-coco-not-json", "detection.eval", val(coco["not_json"]), "is not valid JSON"),
        Row("eval-coco-no-lists", "detection.eval", val(coco["no_lists"]), "is not a COCO detection file"),
        Row("eval-coco-bad-bbox", "detection.eval", val(coco["bad_bbox"]), "bbox"),
        Row("eval-coco-negative-box", "detection.eval", val(coco["neg_box"]), "negative width or height"),
        Row("eval-coco-all-crowd", "detection.eval", val(coco["all_crowd"]), "no usable box"),
        Row("eval-coco-unknown-category", "detection.eval", val(coco["unknown_cat"]), "category_id 77"),
        Row("eval-coco-duplicate-image", "detection.eval", val(coco["dup_image"]), "unique integer 'id'"),
        Row("eval-coco-missing-image-file", "detection.eval", val(coco["missing_file"]), "val/nope.jpg"),
        Row("eval-coco-other-categories", "detection.eval", val(coco["other_cats"]), "differ from the training set"),
        Row("eval-unwritable-results", "detection.eval", [*val(good), "--results", f"{UNWRITABLE}/results.json"],
            f"cannot write {UNWRITABLE}/results.json"),
        Row("eval-bomb-image-skipped", "detection.eval", val(coco["bomb"]), "1 corrupt, skipped", kind="skip"),
        Row("eval-coco-missing-json", "detection.eval", val(root / "nope.json"), "annotation file not found"),
    ]


def predict_rows(f: BadFiles, detector) -> list[Row]:
    root = f.root
    return [
        Row("predict-bomb-image", "detection.predict",
            ["--checkpoint", str(detector), str(f.bomb), "--device", "cpu", "--out-dir", str(root / "pred2")],
            "zz_bomb.png"),
        Row("predict-missing-checkpoint", "detection.predict",
            ["--checkpoint", str(root / "nope.pt"), str(f.corrupt_jpg)], "nope.pt"),
        Row("predict-hostile-checkpoint", "detection.predict",
            ["--checkpoint", str(f.hostile_pt), str(f.corrupt_jpg)], "hostile.pt"),
        Row("predict-missing-image", "detection.predict",
            ["--checkpoint", str(detector), str(root / "nope.jpg"), "--device", "cpu"], "nope.jpg"),
        Row("predict-corrupt-image", "detection.predict",
            ["--checkpoint", str(detector), str(f.corrupt_jpg), "--device", "cpu",
             "--out-dir", str(root / "pred")], "corrupt.jpg"),
        Row("predict-score-thresh-range", "detection.predict",
            ["--checkpoint", str(detector), str(f.corrupt_jpg), "--score-thresh", "7"], "--score-thresh"),
    ]


def train_rows(f: BadFiles, coco: dict) -> list[Row]:
    """detection.train in the run/-o/--out-dir vocabulary; enabled through TRAINERS_READY."""
    demo_root, ann = f.demo_root, f.demo_root / "annotations"
    det = lambda *a: ["-c", str(REPO / "configs" / "detection" / "demo.yaml"),
                      "-o", f"data.train_json={ann / 'instances_train.json'}", "-o", f"data.train_images={demo_root}",
                      "-o", f"data.val_json={ann / 'instances_val.json'}", "-o", f"data.val_images={demo_root}",
                      "-o", "model.backbone=timm:test_resnet", "-o", "run.device=cpu",
                      "--out-dir", str(f.root / "det"), *a]
    return [
        Row("det-train-malformed-yaml", "detection.train", ["-c", str(f.bad_yaml)], "bad.yaml"),
        Row("det-train-tab-yaml", "detection.train", ["-c", str(f.tab_yaml)], "tab.yaml"),
        Row("det-train-workers-negative", "detection.train", det("-o", "run.workers=-1"), "run.workers"),
        Row("det-train-all-crowd", "detection.train", det("-o", f"data.train_json={coco['all_crowd']}"),
            "no usable box"),
        Row("det-train-coco-not-json", "detection.train", det("-o", f"data.train_json={coco['not_json']}"),
            "is not valid JSON"),
        Row("det-train-unwritable-out", "detection.train", det("--out-dir", f"{UNWRITABLE}/det"),
            f"cannot write {UNWRITABLE}"),
    ]


def rows(f: BadFiles) -> list[Row]:
    coco = coco_files(f)
    detector = detection_checkpoint(f.root / "detector.pt", f.demo_root)
    return eval_rows(f, coco, detector) + predict_rows(f, detector) + train_rows(f, coco)


catalogue = catalogue_fixture(rows)
test_bad_input_gives_one_line_error_never_a_traceback = row_test(rows)


def test_zygote_matches_a_real_subprocess(catalogue):
    assert_zygote_matches_a_real_subprocess(catalogue, "eval-coco-all-crowd")
