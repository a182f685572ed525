"""Each loss against an independently written formula (numpy, float64) on random logits."""
import numpy as np
import pytest
import torch

from distill.core.errors import UserError
from distill.losses import DistillLoss, hard_ce_loss, jsd_loss, kl_loss, soft_ce_loss, ssld_loss


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3


def test_ssld_loss_matches_paddleclas_dml_formula(logits):
    s, t = logits
    p, q = softmax(s.double().numpy()), softmax(t.double().numpy())
    eps, n_cls = 1e-12, p.shape[1]
    # PaddleClas DMLLoss: per element cost * class_num, both directions, /2, mean over all elements
    kldiv = lambda x, target: target * np.log((target + eps) / (x + eps)) * n_cls  # noqa: E731
    expected = np.mean((kldiv(p, q) + kldiv(q, p)) / 2)
    got = ssld_loss(s, torch.softmax(t, 1))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_jsd_loss_is_jensen_shannon_and_bounded_by_log2(logits):
    s, t = logits
    p, q = softmax(s.double().numpy()), softmax(t.double().numpy())
    m = (p + q) / 2
    expected = np.mean(0.5 * (q * np.log(q / m)).sum(1) + 0.5 * (p * np.log(p / m)).sum(1))
    got = jsd_loss(s, torch.softmax(t, 1)).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert 0 < got < np.log(2)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_loss_is_hinton_kl_scaled_by_t_squared(logits, temperature):
    s, t = logits
    p, q = softmax(s.double().numpy() / temperature), softmax(t.double().numpy() / temperature)
    expected = np.mean((q * (np.log(q) - np.log(p))).sum(1)) * temperature ** 2
    got = kl_loss(s, torch.softmax(t / temperature, 1), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_ce_loss_matches_formula(logits):
    s, t = logits
    p, q = softmax(s.double().numpy()), softmax(t.double().numpy())
    assert soft_ce_loss(s, torch.softmax(t, 1)).item() == pytest.approx(np.mean(-(q * np.log(p)).sum(1)), rel=1e-5)


def test_losses_are_zero_when_student_equals_teacher(logits):
    s, _ = logits
    q = torch.softmax(s, 1)
    for fn in (ssld_loss, jsd_loss, lambda a, b: kl_loss(a, b, 1.0)):
        assert fn(s, q).item() == pytest.approx(0.0, abs=1e-6)


def test_hard_ce_ignores_unlabeled_and_mixes_targets(logits):
    s, _ = logits
    labels = torch.tensor([3, -1] * 8)
    logp = np.log(softmax(s.double().numpy()))
    labeled = np.arange(16)[::2]
    assert hard_ce_loss(s, labels).item() == pytest.approx(-logp[labeled, 3].mean(), rel=1e-5)
    rolled = labels.roll(1)
    mixed = hard_ce_loss(s, labels, (0.7, rolled)).item()
    expected = 0.7 * -logp[labeled, 3].mean() + 0.3 * -logp[labeled + 1, 3].mean()
    assert mixed == pytest.approx(expected, rel=1e-5)
    assert hard_ce_loss(s, torch.full((16,), -1)).item() == 0.0


def test_distill_loss_adds_weighted_hard_term_only_where_labels_exist(logits):
    s, t = logits
    q = torch.softmax(t, 1)
    labels = torch.tensor([1, -1] * 8)
    crit = DistillLoss("ssld", hard_weight=0.5)
    total, parts = crit(s, q, labels)
    assert set(parts) == {"loss_ssld", "loss_ce"}
    assert total.item() == pytest.approx(ssld_loss(s, q).item() + 0.5 * hard_ce_loss(s, labels).item(), rel=1e-6)
    label_free, parts = DistillLoss("ssld")(s, q, torch.full((16,), -1))
    assert set(parts) == {"loss_ssld"} and label_free.item() == pytest.approx(ssld_loss(s, q).item())
    assert DistillLoss("kl", temperature=4.0).teacher_temperature == 4.0
    assert DistillLoss("ssld", temperature=4.0).teacher_temperature == 1.0
    with pytest.raises(UserError, match="unknown loss.kind"):
        DistillLoss("mse")


def test_ssld_trains_a_student_to_its_teacher_without_any_label():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    teacher = torch.nn.Linear(8, 4)
    student = torch.nn.Linear(8, 4)
    with torch.no_grad():
        q = torch.softmax(teacher(x) * 3, 1)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    crit = DistillLoss("ssld")
    first = None
    for _ in range(300):
        loss, _ = crit(student(x), q)  # no labels passed at all
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    agree = (student(x).argmax(1) == q.argmax(1)).float().mean().item()
    assert loss.item() < 0.2 * first
    assert agree > 0.95
