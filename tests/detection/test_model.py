"""Detection backbone + FPN, aligned RoIAlign, L1 losses: the detectron2 choices on torchvision parts."""
import copy

import pytest
import torch
from timm.layers.norm_act import FrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops import roi_align

from detection.backbone import build_backbone
from detection.config import DEFAULTS
from distill.core.config import Config
from detection.box_heads import box_head_losses
from detection.model import AlignedMultiScaleRoIAlign, L1RegionProposalNetwork, build_detector, param_groups
from distill.students.artifact import build_meta, load_student, save_student
from distill.students.zoo import create_model

FROZEN = (FrozenBatchNorm2d, FrozenBatchNormAct2d)


def student(tmp_path, name, weight_decay):
    model = create_model(name, num_classes=10)
    meta = build_meta(name, 10, model=model, pretrain=dict(weight_decay=weight_decay, weight_decay_kind="coupled"),
                      preprocessing=dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]))
    save_student(tmp_path / f"{name}.safetensors", model, meta)
    return load_student(tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("name", ["r18_vd", "mv3_large"])
def test_fpn_gives_p2_to_p6_at_strides_4_to_64(tmp_path, name):
    trunk, meta = student(tmp_path, name, 1e-5)
    backbone = build_backbone(trunk, meta, out_channels=32).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 128, 192))
    assert list(out) == ["p2", "p3", "p4", "p5", "pool"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(v.shape[1] == 32 for v in out.values())


def test_artifact_backbone_gets_its_normalisation_frozen_bn_multipliers_and_weight_decay(tmp_path):
    trunk, meta = student(tmp_path, "r18_vd", 7e-5)
    cfg = dict(DEFAULTS["model"], fpn_channels=32, box_head_dim=64)
    model = build_detector(cfg, 3, trunk, meta)
    assert (model.transform.image_mean, model.transform.image_std) == ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    body = model.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FROZEN) for m in body.modules())
    groups = param_groups(model, lr=0.02, weight_decay=7e-5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # r50_vd/r18_vd detection default [0.05, 0.05, 0.1, 0.1, 0.15] (PaddleClas SSLD docs, 4.1); FPN and heads x1
    for name, mult in [("conv1.0.weight", 0.05), ("layer1.0.conv1.weight", 0.05), ("layer2.0.conv1.weight", 0.1),
                       ("layer3.0.conv1.weight", 0.1), ("layer4.0.conv1.weight", 0.15)]:
        assert lr_of[id(named["backbone.body.model." + name])] == pytest.approx(0.02 * mult), name
    assert lr_of[id(named["backbone.fpn.inner_blocks.0.0.weight"])] == pytest.approx(0.02)
    assert lr_of[id(named["roi_heads.box_predictor.cls_score.weight"])] == pytest.approx(0.02)

    from detection.train import build_optimizer
    cfg = Config.wrap(dict(DEFAULTS, data=dict(DEFAULTS["data"], batch_size=2)))
    _, lr, wd, why = build_optimizer(cfg, model, meta)
    assert (lr, wd) == (pytest.approx(0.02 * 2 / 16), 7e-5)   # linear scaling; matched l2 from the artifact
    assert "matched" in why


def test_mv3_multipliers_follow_paddledetection_and_zero_freezes_a_stage(tmp_path):
    trunk, meta = student(tmp_path, "mv3_large", 1e-5)
    cfg = dict(DEFAULTS["model"], fpn_channels=32, box_head_dim=64, frozen_bn=False,
               multipliers=[0.0, 0.25, 0.5, 0.5, 0.75])
    model = build_detector(cfg, 3, trunk, meta)
    named = dict(model.named_parameters())
    assert not named["backbone.body.model.conv_stem.weight"].requires_grad        # stage 0 frozen
    assert not named["backbone.body.model.blocks.0.0.conv_dw.weight"].requires_grad
    groups = {id(p): g for g in param_groups(model, lr=1.0, weight_decay=1e-5) for p in g["params"]}
    assert groups[id(named["backbone.body.model.blocks.2.0.conv_pw.weight"])]["lr"] == 0.25
    assert groups[id(named["backbone.body.model.blocks.6.0.conv.weight"])]["lr"] == 0.75   # the 960 conv
    bn = groups[id(named["backbone.body.model.blocks.6.0.bn1.weight"])]                   # trainable BN
    assert (bn["lr"], bn["weight_decay"]) == (0.75, 0.0)   # PaddleDetection: BN follows the block's multiplier, no decay
    assert all(id(p) in groups for n, p in named.items() if p.requires_grad)


def test_random_init_timm_backbone_keeps_trainable_bn_and_plain_multipliers():
    trunk, meta = load_student("timm:resnet10t")
    backbone = build_backbone(trunk, meta, out_channels=16)
    assert not backbone.frozen_bn and backbone.multipliers == [1.0] * 5
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.body.modules())


def test_roi_align_is_aligned_half_pixel():
    # Feature value = column index. A box [0, 4) covers pixels 0..3 whose mean is 1.5 only when pixel
    # centres sit at +0.5 (aligned=True, detectron2 ROIAlignV2); torchvision's default gives 2.0.
    # Adaptive sampling takes ceil(4 / 1) = 4 samples per axis here.
    fmap = torch.arange(16.0).repeat(16, 1)[None, None]
    features = {k: fmap for k in ("p2", "p3", "p4", "p5")}
    pool = AlignedMultiScaleRoIAlign(strides=(1, 2, 4, 8), output_size=1)
    pool.map_levels = lambda boxes: torch.zeros(sum(len(b) for b in boxes), dtype=torch.int64)
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    assert pool(features, [box]).item() == pytest.approx(1.5)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    assert roi_align(fmap, rois, 1, 1.0, 4, aligned=False).item() == pytest.approx(2.0)


def test_pool_assigns_fpn_levels_by_box_size():
    features = {k: torch.full((1, 1, 512 // s, 512 // s), float(i)) for i, (k, s) in
                enumerate(zip(("p2", "p3", "p4", "p5"), (4, 8, 16, 32)))}
    pool = AlignedMultiScaleRoIAlign(output_size=1)
    boxes = torch.tensor([[0, 0, 32, 32], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 500, 500]], dtype=torch.float)
    # FPN eq. 1: k = floor(4 + log2(sqrt(wh) / 224)), clamped to 2..5
    assert pool(features, [boxes]).flatten().tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-5)


def test_box_head_loss_is_l1_over_foreground_normalised_by_all_samples():
    logits = torch.zeros(4, 3)
    deltas = torch.zeros(4, 12)
    deltas[0, 4:8] = torch.tensor([0.5, -0.5, 1.0, 0.0])       # class-1 deltas of sample 0
    labels = torch.tensor([1, 0, 0, 2])
    targets = torch.zeros(4, 4)
    targets[3] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    cls_loss, box_loss = box_head_losses(logits, deltas, labels, targets)
    assert cls_loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert box_loss.item() == pytest.approx((2.0 + 2.0) / 4)     # |0.5|+|-0.5|+|1| + |0-2|, over 4 samples
    agnostic = torch.zeros(4, 4)
    agnostic[0] = torch.tensor([0.05, 0.0, 0.0, 0.0])             # smooth-L1 (beta 1/9) would give 0.5*0.05^2*9
    assert box_head_losses(logits, agnostic, torch.tensor([1, 0, 0, 0]), torch.zeros(4, 4))[1].item() == \
        pytest.approx(0.05 / 4)


def test_rpn_box_loss_is_l1():
    rpn = L1RegionProposalNetwork(None, None, 0.7, 0.3, 4, 0.5, dict(training=1, testing=1),
                                  dict(training=1, testing=1), 0.7)
    labels = [torch.tensor([1.0, 0.0, 0.0, -1.0])]
    deltas = torch.tensor([[0.05, 0.0, 0.0, 0.0]] + [[0.0] * 4] * 3)
    _, box_loss = rpn.compute_loss(torch.zeros(4, 1), deltas, labels, [torch.zeros(4, 4)])
    assert box_loss.item() == pytest.approx(0.05 / 3)     # 1 positive + 2 negatives sampled


@pytest.mark.parametrize("arch", ["faster", "cascade"])
def test_both_archs_train_on_images_without_boxes(arch):
    torch.manual_seed(0)
    trunk, meta = load_student("timm:resnet10t")
    cfg = copy.deepcopy(DEFAULTS["model"])
    cfg.update(arch=arch, fpn_channels=16, box_head_dim=32, train_sizes=[64], test_size=64, max_size=64,
               rpn_post_nms_train=50, roi_batch_per_image=32)
    model = build_detector(cfg, 3, trunk, meta).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64)),
               dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0]]), labels=torch.tensor([2]))]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    losses = model(images[:1], targets[:1])                      # a batch with no box at all
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_box_reg"].item() == 0.0


def test_multiscale_training_draws_the_shorter_side_and_test_uses_test_size():
    from detection.model import DetectionTransform
    transform = DetectionTransform([48, 64, 80], test_size=96, max_size=1000, mean=(0.5,) * 3, std=(0.2,) * 3)
    image = torch.rand(3, 40, 60)
    transform.train()
    torch.manual_seed(0)
    seen = {transform([image])[0].image_sizes[0][0] for _ in range(30)}
    assert seen == {48, 64, 80}
    transform.eval()
    assert transform([image])[0].image_sizes[0] == (96, 144)


def randomised_bn_student(tmp_path, name):
    """A student whose BN statistics and affine are far from identity, so a wrong fold shows."""
    trunk, meta = student(tmp_path, name, 1e-5)
    g = torch.Generator().manual_seed(1)
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))
    return trunk, meta


@pytest.mark.parametrize("name, arch", [("r18_vd", "faster"), ("mv3_large", "cascade")])
def test_folded_frozen_bn_and_channels_last_keep_outputs_losses_gradients_and_state_dict(tmp_path, name, arch):
    from detection.bench import previous_path
    from detection.backbone import FoldedConv2d

    trunk, meta = randomised_bn_student(tmp_path, name)
    cfg = dict(copy.deepcopy(DEFAULTS["model"]), arch=arch, fpn_channels=32, box_head_dim=64, train_sizes=[96],
               test_size=96, max_size=96, rpn_post_nms_train=100, rpn_post_nms_test=100, roi_batch_per_image=64,
               score_thresh=0.0)
    torch.manual_seed(0)
    fast = build_detector(cfg, 3, trunk, meta)
    frozen = sum(isinstance(m, FROZEN) for m in fast.backbone.body.modules())
    assert fast.backbone.folded_bn == frozen > 10                 # every frozen BN follows a conv here
    assert sum(isinstance(m, FoldedConv2d) for m in fast.modules()) == frozen
    slow = previous_path(copy.deepcopy(fast))
    assert not any(isinstance(m, FoldedConv2d) for m in slow.modules())
    assert list(fast.state_dict()) == list(slow.state_dict())    # checkpoints load either way
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [dict(boxes=torch.tensor([[8.0, 10.0, 60.0, 70.0]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[30.0, 20.0, 90.0, 50.0]]), labels=torch.tensor([2]))]

    fast.eval(), slow.eval()
    assert fast.backbone.memory_format == torch.channels_last          # channels_last, train and test
    assert slow.backbone.memory_format == torch.contiguous_format
    with torch.inference_mode():
        a, b = fast(images), slow(images)
        fa, fb = fast.backbone(torch.stack(images)), slow.backbone(torch.stack(images))
    assert all((fa[k] - fb[k]).abs().max() <= 1e-5 * fb[k].abs().max() for k in fa)   # float rounding only
    for x, y in zip(a, b):
        assert len(x["boxes"]) == len(y["boxes"]) > 0
        assert torch.allclose(x["scores"], y["scores"], atol=1e-4)
        assert torch.allclose(x["boxes"], y["boxes"], atol=1e-2)
        assert torch.equal(x["labels"], y["labels"])

    losses = {}
    for key, model in (("fast", fast), ("slow", slow)):
        model.train()
        torch.manual_seed(5)                                      # same proposal and RoI sampling
        out = model(images, targets)
        sum(out.values()).backward()
        losses[key] = {k: v.item() for k, v in out.items()}
    # Float rounding can flip a near-tie in a cascade stage's proposal matching (seen: mv3 cascade, one
    # stage's classification loss 0.18% apart); a wrong fold or layout moves every loss by O(1).
    assert losses["fast"] == pytest.approx(losses["slow"], rel=1e-2, abs=1e-5)
    grads = [(n, p.grad, q.grad) for (n, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters())
             if p.grad is not None and n.startswith("backbone.body")]
    # Whole-tensor relative error, for the same reason: a flipped tie moves single small entries by a few 1e-3
    # of the tensor's largest, never the tensor as a whole; a wrong fold or layout would (O(1) errors).
    rel = [(n, float((g - h).norm() / h.norm().clamp_min(1e-12))) for n, g, h in grads]
    bad = [(n, r) for n, r in rel if r > 1e-2]
    assert grads and not bad, bad[:5]
