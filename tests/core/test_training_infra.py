"""Shared training pieces: checkpoints + RNG, metrics (single and 2-process), run logs and curves."""
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from distill.core.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from distill.core.errors import UserError
from distill.core.metrics import evaluate_classifier, topk_correct
from distill.core.runlog import RunLog, group_by_unit, plot_metrics, read_metrics
from distill.core.schedule import scale_lr


def draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_roundtrips_through_a_safe_checkpoint(tmp_path):
    state = capture_rng()
    expected = [draw() for _ in range(3)]
    save_checkpoint(tmp_path / "ck.pt", {"rng": state, "step": 7})
    ck = load_checkpoint(tmp_path / "ck.pt")  # weights_only=True underneath
    restore_rng(ck["rng"])
    assert [draw() for _ in range(3)] == expected and ck["step"] == 7


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


class Evil:
    pass


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="holds Python objects other than tensors .* it was not loaded") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)   # one line, not torch's advice


def test_linear_lr_scaling():
    assert scale_lr(0.1, 1024, 256) == pytest.approx(0.4)


class Fixed(torch.nn.Module):
    """Returns precomputed logits for the images' index stored in pixel [0,0,0]."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def reference_metrics(logits, targets):
    order = np.argsort(-logits, axis=1)
    top1 = np.mean(order[:, 0] == targets) * 100
    top5 = np.mean([t in row[:5] for row, t in zip(order, targets)]) * 100
    per_class = [np.mean(order[targets == c, 0] == c) for c in np.unique(targets)]
    return top1, top5, np.mean(per_class) * 100


def test_evaluate_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    n, c = 53, 7
    logits = torch.randn(n, c, generator=g)
    targets = torch.randint(0, c, (n,), generator=g)
    targets[:20] = 0  # imbalanced: mean per-class differs from top-1
    images = torch.arange(n).float()[:, None, None, None].expand(n, 1, 1, 1)
    loader = [(images[i:i + 8], targets[i:i + 8]) for i in range(0, n, 8)]
    got = evaluate_classifier(Fixed(logits), loader, "cpu", num_classes=c)
    top1, top5, mpc = reference_metrics(logits.numpy(), targets.numpy())
    assert got["n"] == n
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)
    assert got["mean_per_class"] == pytest.approx(mpc) and abs(mpc - top1) > 1e-6
    assert topk_correct(torch.tensor([[0.1, 0.9]]), torch.tensor([0]), (1, 2)) == [0, 1]
    matrix = evaluate_classifier(Fixed(logits), loader, "cpu", num_classes=c, confusion=True)["confusion"]
    expected = np.zeros((c, c))
    np.add.at(expected, (targets.numpy(), logits.argmax(1).numpy()), 1)
    assert np.array_equal(matrix.numpy(), expected) and "confusion" not in got


def test_evaluate_two_processes_equals_one(tmp_path):
    script = tmp_path / "ev.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch
        from torch.utils.data import DataLoader, TensorDataset
        from torch.utils.data.distributed import DistributedSampler
        from distill.core.distributed import init_distributed, cleanup
        from distill.core.metrics import evaluate_classifier
        info = init_distributed("cpu")
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g)
        model = torch.nn.Linear(5, 4)
        torch.nn.init.normal_(model.weight, generator=g)
        ds = TensorDataset(x, y)
        sampler = DistributedSampler(ds, shuffle=False) if info.distributed else None
        r = evaluate_classifier(model, DataLoader(ds, batch_size=6, sampler=sampler), info.device, 4)
        if info.is_main:
            json.dump(r, open(sys.argv[1], "w"))
        cleanup()
    """))
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    "29517", str(script), str(tmp_path / "two.json")], check=True, capture_output=True)
    import json
    one, two = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert one == pytest.approx(two) and two["n"] == 40


def test_runlog_resume_drops_rows_after_checkpoint_and_plots(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, loss=1.0 / step, lr=0.1)
    log.log(5, top1=42.0)
    log.close()
    resumed = RunLog(tmp_path, tensorboard=False, resume_step=3)  # checkpoint was at step 3
    resumed.log(4, loss=0.3)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.3
    png = plot_metrics(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    fresh = RunLog(tmp_path, tensorboard=False)  # a fresh run starts a fresh file
    fresh.log(1, loss=9.0)
    assert len(read_metrics(tmp_path / "metrics.csv")) == 1


def test_curves_have_one_unit_per_panel_and_epochs_on_the_top_axis(tmp_path, monkeypatch):
    """epoch, img/s and skipped images once shared an "other" panel, read against one scale."""
    log = RunLog(tmp_path, tensorboard=False)
    for step in range(1, 9):
        log.log(step, loss=2.0 / step, loss_ssld=1.0 / step, lr=0.1, epoch=step / 4, img_per_s=400.0)
    log.log(8, top1=40.0, top1_test_res=42.0, skipped_images=0)
    for step in (4, 8):
        log.log(step, images=24, corrupt=0)   # eval bookkeeping: a constant and a zero count
    log.close()
    ssld = group_by_unit(["loss", "loss_ssld", "lr", "epoch", "img_per_s", "top1", "top1_test_res",
                          "skipped_images", "grad_norm"])
    assert ssld == {"loss": ("loss", ["loss", "loss_ssld"]), "accuracy": ("accuracy (%)", ["top1", "top1_test_res"]),
                    "learning rate": ("learning rate", ["lr"]), "throughput": ("images / s", ["img_per_s"]),
                    "skipped images": ("images", ["skipped_images"]), "grad_norm": ("grad_norm", ["grad_norm"])}
    detection = group_by_unit(["loss", "loss_classifier", "lr", "img_per_s", "AP", "AP50", "APs"])
    assert detection["box AP"] == ("AP (%)", ["AP", "AP50", "APs"]) and list(detection)[:2] == ["loss", "box AP"]

    from matplotlib.figure import Figure
    saved, real_savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig) or real_savefig(fig, *a, **k))
    png = plot_metrics(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    panels = [ax for ax in saved[0].axes if ax.get_visible()]
    # no skipped or corrupt images -> no panel for them, nor for the constant; epoch is the top axis, not a curve
    assert [ax.get_title() for ax in panels] == ["loss", "accuracy", "learning rate  (lr)", "throughput  (img_per_s)"]
    assert [ax.get_ylabel() for ax in panels] == ["loss", "accuracy (%)", "learning rate", "images / s"]
    assert all(line.get_label() != "epoch" for ax in panels for line in ax.get_lines())
    assert all(len(ax.child_axes) == 1 for ax in panels)   # the epoch axis on top
