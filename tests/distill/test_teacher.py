"""The frozen teacher: BN modes, ensembles, its own resolution, loading, and consistent views."""
import pytest
import torch
import torch.nn.functional as F

from distill.students.artifact import build_meta, save_student
from distill.core.checkpoint import save_checkpoint
from distill.core.errors import UserError
from distill.losses import DistillLoss
from distill.core.precision import Precision
from distill.ssld import distill_step
from distill.teacher import Teacher, build_teacher, load_teacher_model
from distill.students.zoo import create_model

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny(seed=0, arch="test_resnet", num_classes=4):
    torch.manual_seed(seed)
    return create_model(arch, num_classes=num_classes)


def meta_of(model, arch="test_resnet"):
    return build_meta(arch, 4, model=model)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_teacher_is_frozen_and_bn_train_mode_leaves_running_stats_untouched():
    model = tiny()
    before = state(model)
    x = torch.randn(8, 3, 32, 32)
    teacher = Teacher([model], [meta_of(model)], bn="train")
    probs = teacher(x)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "num_batches" not in k)
    assert torch.allclose(probs.sum(1), torch.ones(8))
    # train mode normalises with the batch's statistics: differs from eval mode (running stats)
    eval_probs = Teacher([model], [meta_of(model)], bn="eval")(x)
    model.eval()
    assert torch.allclose(eval_probs, torch.softmax(model(x), 1), atol=1e-6)
    assert not torch.allclose(probs, eval_probs, atol=1e-4)
    with pytest.raises(UserError, match="teacher.bn"):
        Teacher([model], [meta_of(model)], bn="frozen")


def test_ensemble_is_the_mean_of_probabilities_and_temperature_softens():
    a, b = tiny(0), tiny(1)
    x = torch.randn(4, 3, 32, 32)
    teacher = Teacher([a, b], [meta_of(a), meta_of(b)], bn="eval")
    with torch.no_grad():
        expected = (torch.softmax(a(x) / 2, 1) + torch.softmax(b(x) / 2, 1)) / 2
    assert torch.allclose(teacher(x, temperature=2.0), expected, atol=1e-6)


def test_teacher_at_its_own_resolution_sees_the_same_crop_resized():
    model = tiny()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.randn(2, 3, 32, 32)
    Teacher([model], [meta_of(model)], bn="eval", input_size=48)(x)
    expected = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    assert seen[0].shape == (2, 3, 48, 48) and torch.equal(seen[0], expected)


def test_teacher_with_other_mean_std_gets_renormalised_pixels():
    model = tiny()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    meta = build_meta("test_resnet", 4, model=model, preprocessing=dict(mean=[0.5] * 3, std=[0.5] * 3))
    raw = torch.rand(2, 3, 32, 32)
    student_view = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    Teacher([model], [meta], bn="eval", student_mean=MEAN, student_std=STD)(student_view)
    assert torch.allclose(seen[0], (raw - 0.5) / 0.5, atol=1e-5)


@pytest.mark.parametrize("mix", [None, 0.7])
@pytest.mark.parametrize("teacher_size", [None, 40])
def test_teacher_receives_exactly_the_students_augmented_pixels(mix, teacher_size):
    student, t_model = tiny(0), tiny(1)
    student_in, teacher_in = [], []
    student.register_forward_pre_hook(lambda m, args: student_in.append(args[0].clone()))
    t_model.register_forward_pre_hook(lambda m, args: teacher_in.append(args[0].clone()))
    teacher = Teacher([t_model], [meta_of(t_model)], input_size=teacher_size)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    distill_step(student, teacher, DistillLoss("ssld"), images, labels, opt, Precision("off", "cpu"), mix=mix)
    if mix is not None:  # function matching: mixed with the batch rolled by one, before either network
        assert torch.allclose(student_in[0], mix * images + (1 - mix) * images.roll(1, 0))
    else:
        assert torch.equal(student_in[0], images)
    expected = student_in[0] if teacher_size is None else F.interpolate(
        student_in[0], size=(teacher_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(teacher_in[0], expected)


def test_teacher_loads_from_artifact_checkpoint_and_timm_name(tmp_path, ssld_home):
    model = tiny(3)
    meta = meta_of(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    save_student(tmp_path / "t.safetensors", model, meta)
    save_checkpoint(tmp_path / "t.pt", {"model": model.state_dict(), "meta": meta})
    save_student(ssld_home / "named_teacher.safetensors", model, meta)
    for source in (tmp_path / "t.safetensors", tmp_path / "t.pt", "named_teacher"):
        loaded, _ = load_teacher_model(source, 4)
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
    timm_model, timm_meta = load_teacher_model("timm:test_resnet", 4)
    assert timm_meta["arch"] == "test_resnet"
    teacher = build_teacher({"models": [str(tmp_path / "t.pt"), "timm:test_resnet"], "bn": "eval"}, 4, MEAN, STD)
    assert len(teacher.models) == 2
    assert build_teacher(None, 4, MEAN, STD) is None
    with pytest.raises(UserError, match="predicts 4 classes but the student has 10"):
        build_teacher({"models": [str(tmp_path / "t.pt")]}, 10, MEAN, STD)
    with pytest.raises(UserError, match="no student artifact"):
        build_teacher({"models": ["no_such_teacher"]}, 4, MEAN, STD)


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_fast_teacher_pass_gives_the_plain_loops_probabilities_and_a_loss_that_backpropagates(bn):
    """Inference mode + channels_last (the default of Teacher.to) change no number, and the result is an
    ordinary tensor: the student's loss can save it for backward."""
    model = tiny(seed=3)
    plain = tiny(seed=3)
    plain.eval()
    if bn == "train":
        for m in plain.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = F.softmax(plain(x), dim=1)
    teacher = Teacher([model], [meta_of(model)], bn=bn).to("cpu")
    assert teacher.memory_format == torch.channels_last
    probs = teacher(x)
    assert not probs.is_inference()
    assert torch.allclose(probs, expected, atol=1e-5)
    student = tiny(seed=4)
    loss = -(probs * F.log_softmax(student(x), dim=1)).sum(1).mean()
    loss.backward()                      # would raise "Inference tensors cannot be saved for backward"
    assert next(student.parameters()).grad is not None
