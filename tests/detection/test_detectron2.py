"""detection.detectron2: students as detectron2 backbones, the SSLD optimizer, the detectron2 engine end to end,
and the two engines checked against each other. Every test that needs detectron2 lives here, under the one skip
below (test_detectron2_install.py checks the error without it)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.core.errors import UserError
from distill.students.artifact import build_meta, load_student, save_student
from distill.students.stages import stage_param_groups
from distill.students.zoo import create_model
from helpers import DETECTION_TINY

pytest.importorskip("detectron2", reason="detectron2 is not installed (build it from source: README, 'detectron2 "
                                         "engine'; .ci/run installs a prebuilt wheel when one is beside the checkout)")

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(ROOT / "configs" / "detection" / "demo.yaml")
TINY = DETECTION_TINY


def student(tmp_path, name="r18_vd", weight_decay=7e-5, kind="coupled", **sections):
    """A student artifact (trained weights as far as the kit can tell: FrozenBN) with a recorded L2."""
    model = create_model(name, num_classes=10)
    meta = build_meta(name, 10, model=model, pretrain=dict(weight_decay=weight_decay, weight_decay_kind=kind),
                      preprocessing=dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]), **sections)
    return save_student(tmp_path / f"{name}.safetensors", model, meta)


def user_cfg(path, **ssld):
    """What a detectron2 user writes: detectron2's Base-RCNN-FPN, one import, three lines (and a small model)."""
    from detectron2.config import get_cfg

    import detection.detectron2 as ssld_d2

    cfg = get_cfg()
    configs = Path(sys.modules["detectron2"].__file__).parent / "model_zoo" / "configs"   # shipped in its package
    cfg.merge_from_file(str(configs / "Base-RCNN-FPN.yaml"))
    ssld_d2.add_ssld_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_ssld_fpn_backbone"
    cfg.MODEL.SSLD.STUDENT = str(path)
    for key, value in ssld.items():
        cfg.MODEL.SSLD[key] = value
    cfg.MODEL.DEVICE, cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.ROI_HEADS.NUM_CLASSES = "cpu", 32, 3
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    return cfg


def test_a_student_is_a_detectron2_backbone_under_detectron2s_fpn(tmp_path):
    from detectron2.modeling import FPN, build_model
    from detectron2.layers import FrozenBatchNorm2d as D2FrozenBN

    from detection.detectron2 import SSLDBackbone

    cfg = user_cfg(student(tmp_path), MULTIPLIERS=[0.0, 0.05, 0.1, 0.1, 0.15])
    model = build_model(cfg)
    assert isinstance(model.backbone, FPN) and isinstance(model.backbone.bottom_up, SSLDBackbone)
    bottom_up = model.backbone.bottom_up
    shapes = {k: (v.channels, v.stride) for k, v in bottom_up.output_shape().items()}
    assert shapes == {"res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 32)}   # r18_vd
    with torch.no_grad():
        out = model.backbone(torch.randn(1, 3, 64, 96))
    assert [(k, tuple(v.shape[1:])) for k, v in out.items()] == [
        ("p2", (32, 16, 24)), ("p3", (32, 8, 12)), ("p4", (32, 4, 6)), ("p5", (32, 2, 3)), ("p6", (32, 1, 2))]
    # trained weights: the kit's FrozenBN (folded), never detectron2's converter, which would drop timm's BN+act
    assert bottom_up.frozen_bn
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, D2FrozenBN)) for m in bottom_up.modules())
    assert not any(p.requires_grad for n, p in bottom_up.named_parameters() if "bn" in n)
    trunk = dict(bottom_up.body.model.named_parameters())
    assert not trunk["conv1.0.weight"].requires_grad                  # multiplier 0 freezes the stem
    assert trunk["layer1.0.conv1.weight"].requires_grad


def test_the_student_sees_its_own_preprocessing_whatever_pixel_mean_and_format_say(tmp_path):
    from detectron2.modeling import build_model

    path = student(tmp_path)
    caffe = user_cfg(path)                                             # detectron2's defaults: BGR, caffe mean, std 1
    own = user_cfg(path)
    own.INPUT.FORMAT, own.MODEL.PIXEL_MEAN, own.MODEL.PIXEL_STD = "RGB", [127.5, 102.0, 76.5], [51.0, 63.75, 76.5]
    a, b = build_model(caffe).eval(), build_model(own).eval()
    assert a.backbone.bottom_up.order is not None and b.backbone.bottom_up.order is None   # identity: no extra op
    # 64 x 96: no padding (detectron2 pads with 0 after its normalisation, which is PIXEL_MEAN's colour)
    rgb = torch.randint(0, 256, (3, 64, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        fa = a.backbone.bottom_up(a.preprocess_image([dict(image=rgb.flip(0))]).tensor)
        fb = b.backbone.bottom_up(b.preprocess_image([dict(image=rgb)]).tensor)
        mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
        trunk, _ = load_student(path)
        trunk.eval()
        expected = b.backbone.bottom_up.body(((rgb / 255.0 - mean) / std)[None])
    for k, f in fb.items():
        assert torch.allclose(fa[k], f, rtol=1e-4, atol=1e-4 * float(f.abs().max())), k
    assert torch.allclose(fb["res5"], expected[-1], rtol=1e-4, atol=1e-5)


def test_ssld_optimizer_gives_the_trunk_the_kits_stage_groups_and_matched_decay_and_the_rest_detectron2s(tmp_path):
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler

    from detection.detectron2 import SSLDTrainer, ssld_param_groups

    mults = [0.0, 0.05, 0.1, 0.1, 0.15]
    path = student(tmp_path, weight_decay=7e-5)
    cfg = user_cfg(path, MULTIPLIERS=mults, FROZEN_BN=False)      # trainable BN: its groups show too
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WARMUP_ITERS = 0.02, 1e-4, 10
    model = build_model(cfg)
    groups, notes = ssld_param_groups(cfg, model)
    got = {id(p): (g["lr"], g.get("weight_decay", cfg.SOLVER.WEIGHT_DECAY)) for g in groups for p in g["params"]}
    reference, _ = load_student(path)                              # the rule the kit's detector uses, on a fresh trunk
    want = {n: (g["lr"], g["weight_decay"]) for g in stage_param_groups(reference, mults, lr=0.02, weight_decay=7e-5,
                                                                         family="resnet") for n in g["names"]
            if not n.startswith("fc.")}                                # the classifier: pruned by the feature getter
    prefix = "backbone.bottom_up.body.model."
    trunk = {n[len(prefix):]: p for n, p in model.named_parameters() if n.startswith(prefix)}
    assert {n for n, p in trunk.items() if p.requires_grad} == set(want)           # stage 0 frozen
    for name, p in trunk.items():
        if p.requires_grad:
            assert got[id(p)] == pytest.approx(want[name]), name
    assert got[id(trunk["layer4.0.bn1.weight"])] == pytest.approx((0.02 * 0.15, 7e-5))  # ResNet_vd: BN decayed
    rest = [(n, got[id(p)]) for n, p in model.named_parameters() if not n.startswith(prefix)]
    assert rest and all(v == pytest.approx((0.02, 1e-4)) for _, v in rest)      # detectron2's SOLVER values
    assert len(got) == sum(p.requires_grad for p in model.parameters())
    assert "matched to r18_vd's pretraining L2" in notes[0] and "stage0 frozen" in notes[0]
    assert "MODEL.SSLD.MULTIPLIERS" in notes[0] and "SOLVER.WEIGHT_DECAY" in notes[1]

    optimizer = SSLDTrainer.build_optimizer(cfg, model)           # what a detectron2 project's trainer builds
    scheduler = build_lr_scheduler(cfg, optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[-1]["lr"] / 0.02               # warmup: one factor for every group
    assert 0 < factor < 1
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(factor * got[id(g["params"][0])][0])

    adamw = user_cfg(student(tmp_path, "r34_vd", weight_decay=0.05, kind="decoupled"))
    with pytest.raises(UserError, match="MODEL.SSLD.WEIGHT_DECAY"):
        ssld_param_groups(adamw, build_model(adamw))


def test_the_kit_recipe_becomes_detectron2_keys_and_a_cascade_trains_on_them(tmp_path, demo_root):
    from detectron2.modeling import build_model
    from detectron2.modeling.roi_heads import CascadeROIHeads
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from detection.config import load_detection_config
    from detection.detectron2.config import detectron2_config

    cfg = load_detection_config(DEMO_CONFIG, ["model.arch=cascade", "model.cascade_ious=[0.4,0.55,0.7]",
                                              "schedule.iterations=300", "schedule.steps=[200,300]",
                                              "data.batch_size=4", "model.score_thresh=0.1"])
    _, meta = load_student("timm:test_resnet")
    d2 = detectron2_config(cfg, meta, 4, "train_set", "val_set", tmp_path, torch.device("cpu"))
    assert d2.SOLVER.BASE_LR == pytest.approx(0.01) and d2.SOLVER.IMS_PER_BATCH == 4    # 0.02 at 8, scaled to 4
    assert list(d2.SOLVER.STEPS) == [200] and d2.SOLVER.MAX_ITER == 300     # a step at the end never applies
    assert d2.SOLVER.WEIGHT_DECAY == 1e-4 and d2.MODEL.SSLD.WEIGHT_DECAY == 1e-4          # demo.yaml's, given
    assert [list(s) for s in d2.MODEL.ANCHOR_GENERATOR.SIZES] == [[8], [16], [32], [64], [128]]
    rpn, heads = d2.MODEL.RPN, d2.MODEL.ROI_HEADS
    assert (rpn.PRE_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TRAIN, heads.BATCH_SIZE_PER_IMAGE) == (600, 100, 64)
    assert (d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MAX_SIZE_TEST, d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST) == (32, 48, 0.1)
    assert d2.INPUT.FORMAT == "RGB" and list(d2.MODEL.PIXEL_MEAN) == [127.5] * 3   # timm test_resnet: mean 0.5
    assert list(d2.MODEL.ROI_BOX_CASCADE_HEAD.IOUS) == [0.4, 0.55, 0.7] and d2.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG
    d2.defrost()
    d2.MODEL.SSLD.STUDENT_META = json.dumps(meta)
    model = build_model(d2)
    assert isinstance(model.roi_heads, CascadeROIHeads) and model.roi_heads.num_cascade_stages == 3
    assert model.backbone.bottom_up.order is None                   # the student's normalisation, as is
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    target = Instances((32, 32), gt_boxes=Boxes(torch.tensor([[4.0, 5.0, 25.0, 26.0]])), gt_classes=torch.tensor([2]))
    with EventStorage():                                            # two images: trainable BN at a 1x1 res5
        losses = model([dict(image=image, instances=target), dict(image=image.flip(-1), instances=target)])
    assert {"loss_cls_stage2", "loss_box_reg_stage2", "loss_rpn_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def d2_train(tmp_path_out, train_json, val_json, root, *extra, restart=False):
    from detection.config import load_detection_config
    from detection.detectron2.train import train
    from distill.core.distributed import init_distributed

    overrides = [f"data.train_json={train_json}", f"data.train_images={root}", f"data.val_json={val_json}",
                 f"data.val_images={root}", *TINY, *extra]
    cfg = load_detection_config(DEMO_CONFIG, overrides)
    return train(cfg, init_distributed("cpu"), Path(tmp_path_out), restart)


def subset(demo_root, tmp_path, n, name, every=12):
    coco = json.loads((demo_root / "annotations" / "instances_train.json").read_text())
    keep = [img["id"] for img in coco["images"]][::every][:n]
    data = dict(coco, images=[i for i in coco["images"] if i["id"] in keep],
                annotations=[a for a in coco["annotations"] if a["image_id"] in keep])
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_detectron2_engine_trains_resumes_and_eval_and_predict_read_its_model(tmp_path, demo_root, capsys):
    from detection import eval as det_eval
    from detection import predict as det_predict
    from distill.core.checkpoint import load_checkpoint

    train_json = subset(demo_root, tmp_path, 8, "train.json", every=6)
    val_json = demo_root / "annotations" / "instances_val.json"
    out = tmp_path / "run"
    common = ("schedule.steps=[3]", "run.checkpoint_period=2", "run.eval_period=0")
    metrics = d2_train(out, train_json, val_json, demo_root, "schedule.iterations=4", *common)
    err = capsys.readouterr().err
    assert "multipliers [1.0, 1.0, 1.0, 1.0, 1.0] (the student's recommended.detection)" in err   # timm:test_resnet
    assert "weight decay 0.0001 (MODEL.SSLD.WEIGHT_DECAY)" in err and "weight decay 0.0001 (SOLVER.WEIGHT_DECAY)" in err
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["engine"] == "detectron2" and summary["images"] == 24
    assert {k: summary[k] for k in metrics} == metrics and {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    ckpt = load_checkpoint(out / "model_final.pt")
    assert ckpt["engine"] == "detectron2" and ckpt["iteration"] == 4 and ckpt["classes"][0] == "circle"
    assert (out / "detectron2" / "last_checkpoint").read_text() == "model_final.pth"
    assert len(list((out / "predictions").glob("*.png"))) == 4

    # detection.eval rebuilds it from model_final.pt alone (no student file) and scores what COCOEvaluator scored
    again = det_eval.main(["--checkpoint", str(out / "model_final.pt"), "--workers", "0", "--batch-size", "1",
                           "--results", str(tmp_path / "dets.json")])
    for k in ("AP", "AP50", "AP75"):
        assert again[k] == pytest.approx(metrics[k], abs=1e-6), k
    ours = sorted(json.loads((tmp_path / "dets.json").read_text()), key=lambda d: (d["image_id"], -d["score"]))
    theirs = sorted(json.loads((out / "detectron2" / "inference" / "coco_instances_results.json").read_text()),
                    key=lambda d: (d["image_id"], -d["score"]))
    assert len(ours) == len(theirs) > 24                           # the very detections COCOEvaluator scored
    for a, b in zip(ours, theirs):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5) and a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
    images = sorted((demo_root / "val").rglob("*.jpg"))[:2]
    det_predict.main(["--checkpoint", str(out / "model_final.pt"), *map(str, images), "--out-dir",
                      str(tmp_path / "pred"), "--score-thresh", "0.0"])
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == sorted(f"{p.stem}.png" for p in images)

    # rerunning with more iterations resumes at 4 (detectron2's resume); another config is refused by key
    d2_train(out, train_json, val_json, demo_root, "schedule.iterations=6", *common)
    assert "resuming at iteration 4" in capsys.readouterr().err
    events = [json.loads(line) for line in (out / "detectron2" / "metrics.json").read_text().splitlines()]
    steps = [e["iteration"] for e in events if "total_loss" in e]
    assert steps == [0, 1, 2, 3, 4, 5]                             # no iteration twice
    assert load_checkpoint(out / "model_final.pt")["iteration"] == 6
    with pytest.raises(UserError, match=r"another config \(model.fpn_channels: 32 -> 16"):
        d2_train(out, train_json, val_json, demo_root, "schedule.iterations=6", *common, "model.fpn_channels=16")
    d2_train(out, train_json, val_json, demo_root, "schedule.iterations=2", *common, "model.fpn_channels=16",
             restart=True)
    assert load_checkpoint(out / "model_final.pt")["iteration"] == 2


def test_detection_train_engine_flag_runs_the_recipe_through_detectron2(tmp_path, demo_root):
    from detection import train as det_train

    val_json = demo_root / "annotations" / "instances_val.json"
    few = subset(demo_root, tmp_path, 4, "few.json", every=12)
    overrides = [f"data.train_json={few}", f"data.train_images={demo_root}", f"data.val_json={val_json}",
                 f"data.val_images={demo_root}", *TINY, "schedule.iterations=2", "schedule.steps=[1]"]
    out = tmp_path / "cli"
    metrics = det_train.main(["-c", "detection/demo", "--engine", "detectron2", "--out-dir", str(out),
                              *[a for o in overrides for a in ("-o", o)]])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["engine"] == "detectron2" and summary["AP"] == metrics["AP"]
    assert (out / "detectron2" / "last_checkpoint").is_file() and not (out / "checkpoint.pt").exists()


def test_kit_coco_eval_and_detectron2_coco_evaluator_agree_on_the_same_predictions(tmp_path, demo_root):
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    from detection.coco_eval import METRICS, coco_box_metrics, to_coco_results
    from detection.data import load_coco
    from detection.detectron2.config import register_split
    from detection.detectron2.train import coco_metrics

    gt = json.loads((demo_root / "annotations" / "instances_val.json").read_text())
    gt["annotations"][0]["iscrowd"] = 1                          # crowd regions must be handled alike
    path = tmp_path / "val.json"
    path.write_text(json.dumps(gt))
    split = load_coco(path, demo_root)
    name = register_split(split)
    DatasetCatalog.get(name)                                      # detectron2 reads the json: its id mapping
    rng = np.random.default_rng(0)
    by_image = {i: [] for i in split.image_ids}
    for ann in gt["annotations"]:                                 # jittered true boxes, some with the wrong class
        x, y, w, h = ann["bbox"]
        for _ in range(int(rng.integers(1, 3))):
            box = np.round((np.array([x, y, x + w, y + h]) + rng.normal(0, 0.15, 4) * [w, h, w, h]) * 8) / 8
            cat = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(split.category_ids))
            by_image[ann["image_id"]].append((box, split.category_ids.index(cat)))
    for image_id in by_image:                                     # and false positives
        for _ in range(int(rng.integers(0, 3))):
            x0, y0 = rng.uniform(0, 50, 2)
            by_image[image_id].append((np.round(np.array([x0, y0, x0 + 12, y0 + 9]) * 8) / 8,
                                       int(rng.integers(0, len(split.category_ids)))))
    scores = iter(rng.permutation(10_000)[:sum(map(len, by_image.values()))] / 10_000 + 1e-4)   # distinct, 4 decimals
    detections = {}
    for image_id, found in by_image.items():
        detections[image_id] = dict(boxes=torch.tensor(np.array([b for b, _ in found]), dtype=torch.float32),
                                    scores=torch.tensor([next(scores) for _ in found], dtype=torch.float32),
                                    labels=torch.tensor([c + 1 for _, c in found]))

    kit = coco_box_metrics(path, to_coco_results(list(detections.values()), list(detections), split.category_ids))
    evaluator = COCOEvaluator(name, output_dir=None)
    evaluator.reset()
    for image_id, det in detections.items():
        instances = Instances((64, 64), pred_boxes=Boxes(det["boxes"]), scores=det["scores"],
                              pred_classes=det["labels"] - 1)
        evaluator.process([dict(image_id=image_id)], [dict(instances=instances)])
    d2 = coco_metrics(evaluator.evaluate())
    assert 5 < kit["AP"] < 95                                     # a non-trivial case
    for k in METRICS:
        assert d2[k] == pytest.approx(kit[k], abs=1e-9), k


def test_both_engines_overfit_two_images_alike_on_the_same_data_and_schedule(tmp_path, demo_root):
    """Same student (timm:test_resnet at random init), data, schedule and seed through both engines. Measured
    over seeds 0-2 (docs/benchmarks.md): AP50 100 on every run of both; AP 65 / 75 / 55 (kit) and 75 / 70 / 75
    (detectron2), so two correct engines differ by up to 20 AP on one seed here: the tolerance is 25 AP and
    10 AP50. A recipe that does not learn (a wrong lr, frozen stages, lost boxes) stays far below AP50 90."""
    from detection import train as det_train

    few = subset(demo_root, tmp_path, 2, "few.json")
    schedule = ["model.train_sizes=[64]", "data.batch_size=2", "schedule.iterations=100", "schedule.steps=[100]",
                "schedule.warmup_iters=10", "data.hflip=0.0", "run.log_period=50", "run.checkpoint_period=0",
                "run.seed=0"]
    args = ["-c", DEMO_CONFIG, "--out-dir", str(tmp_path / "kit")]
    for o in [f"data.train_json={few}", f"data.train_images={demo_root}", f"data.val_json={few}",
              f"data.val_images={demo_root}", *TINY, *schedule]:
        args += ["-o", o]
    kit = det_train.main(args)
    d2 = d2_train(tmp_path / "d2", few, few, demo_root, *schedule)
    assert kit["AP50"] >= 90 and d2["AP50"] >= 90, (kit, d2)
    assert abs(kit["AP50"] - d2["AP50"]) <= 10 and abs(kit["AP"] - d2["AP"]) <= 25, (kit, d2)
