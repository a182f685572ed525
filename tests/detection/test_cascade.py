"""Cascade R-CNN heads: per-stage IoU thresholds and box-coder weights, 1/3 gradient, averaged scores."""
import pytest
import torch
import torch.nn as nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from detection.cascade import DEFAULT_WEIGHTS, CascadeRoIHeads, scale_gradient
from detection.box_heads import BoxPredictor
from detection.model import AlignedMultiScaleRoIAlign

GT = torch.tensor([[20.0, 20.0, 60.0, 60.0]])


def shifted(dx):
    return GT + torch.tensor([dx, 0.0, dx, 0.0])


def make_heads(num_classes=2, dim=16):
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(4 * 49, dim), nn.ReLU()) for _ in range(3)]
    predictors = [BoxPredictor(dim, num_classes, class_agnostic=True) for _ in range(3)]
    return CascadeRoIHeads(AlignedMultiScaleRoIAlign(), heads, predictors, score_thresh=0.0)


def features(size=128):
    torch.manual_seed(0)
    return {k: torch.randn(1, 4, size // s, size // s) for k, s in zip(("p2", "p3", "p4", "p5"), (4, 8, 16, 32))}


def test_each_stage_labels_with_its_own_iou_threshold():
    # IoU with the ground truth of a box shifted by dx: 40-dx / 40+dx
    proposals = torch.cat([shifted(dx) for dx in (11.0, 8.0, 4.0, 1.0)])
    ious = box_iou(GT, proposals)[0]
    assert ious.tolist() == pytest.approx([29 / 51, 32 / 48, 36 / 44, 39 / 41])  # 0.57, 0.67, 0.82, 0.95
    heads = make_heads()
    targets = [dict(boxes=GT, labels=torch.tensor([2]))]
    foreground = [heads.label_boxes(k, [proposals], targets)[0][0].tolist() for k in range(3)]
    assert foreground == [[2, 2, 2, 2],     # IoU >= 0.5
                          [0, 2, 2, 2],     # IoU >= 0.6
                          [0, 0, 2, 2]]     # IoU >= 0.7


def test_each_stage_encodes_with_its_own_box_coder_weights():
    heads = make_heads()
    proposals = [torch.cat([shifted(3.0), shifted(-5.0)])]
    matched = [GT.repeat(2, 1)]
    targets = [heads.regression_targets(k, matched, proposals)[0] for k in range(3)]
    for k, weights in enumerate(DEFAULT_WEIGHTS):
        expected = BoxCoder(weights).encode_single(matched[0], proposals[0])
        assert torch.allclose(targets[k], expected)
    # (20,20,10,10) and (30,30,15,15) are 2x and 3x (10,10,5,5): targets scale the same way
    assert torch.allclose(targets[1], 2 * targets[0]) and torch.allclose(targets[2], 3 * targets[0])
    assert targets[0][0, 0].item() == pytest.approx(10 * (-3.0 / 40))


def test_training_relabels_refined_boxes_stage_by_stage():
    heads = make_heads().train()
    calls = []
    original = heads.label_boxes

    def spy(stage, proposals, targets):
        labels, matched = original(stage, proposals, targets)
        calls.append((stage, heads.matchers[stage].high_threshold, sum(len(p) for p in proposals)))
        return labels, matched
    heads.label_boxes = spy
    proposals = [torch.cat([shifted(dx) for dx in (11.0, 7.0, 4.0, 1.0, 30.0)])]
    targets = [dict(boxes=GT, labels=torch.tensor([1]))]
    _, losses = heads(features(), proposals, [(128, 128)], targets)
    # sampling (stage 0), then one labelling per stage with 0.5 / 0.6 / 0.7
    assert [c[:2] for c in calls] == [(0, 0.5), (0, 0.5), (1, 0.6), (2, 0.7)]
    assert calls[1][2] == 6                                  # 5 proposals + the ground truth, all sampled
    assert sorted(losses) == sorted(f"loss_{n}_s{k}" for k in range(3) for n in ("classifier", "box_reg"))


def test_gradient_into_pooled_features_is_scaled_by_one_over_stages():
    x = torch.ones(3, requires_grad=True)
    scale_gradient(x, 1 / 3).sum().backward()
    assert x.grad.tolist() == pytest.approx([1 / 3] * 3)
    heads = make_heads().train()
    feats = {k: v.requires_grad_() for k, v in features().items()}
    targets = [dict(boxes=GT, labels=torch.tensor([1]))]
    _, losses = heads(feats, [shifted(2.0)], [(128, 128)], targets)
    g_scaled = torch.autograd.grad(losses["loss_classifier_s0"], feats["p2"])[0]
    import detection.cascade as cascade
    original, cascade.scale_gradient = cascade.scale_gradient, (lambda t, s: t)
    try:
        _, losses = heads(feats, [shifted(2.0)], [(128, 128)], targets)
        g_plain = torch.autograd.grad(losses["loss_classifier_s0"], feats["p2"])[0]
    finally:
        cascade.scale_gradient = original
    assert torch.allclose(g_scaled, g_plain / 3, atol=1e-8) and g_plain.abs().sum() > 0


def test_inference_averages_stage_scores_and_keeps_last_stage_boxes():
    heads = make_heads().eval()
    probs, deltas = [], []

    def record(module, inputs, out):
        probs.append(out[0].softmax(-1))
        deltas.append(out[1])
    for predictor in heads.box_predictors:
        predictor.register_forward_hook(record)
    with torch.no_grad():
        det, _ = heads(features(), [shifted(2.0)], [(128, 128)])
    mean = sum(probs) / 3
    assert sorted(det[0]["scores"].tolist()) == pytest.approx(sorted(mean[0, 1:].tolist()))
    box = shifted(2.0)
    for k in range(3):       # each stage refines the previous stage's box with its own coder
        box = BoxCoder(DEFAULT_WEIGHTS[k]).decode_single(deltas[k], box).clamp(0, 128)
    assert torch.allclose(det[0]["boxes"][0], box[0], atol=1e-4)
