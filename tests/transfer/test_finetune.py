"""Fine-tuning behaviour on tiny real images: matched decay and multipliers reach the optimizer and the
weights, resume is exact, Fix touches only the classifier (and BN statistics when asked), and the
fine-tuned model is a loadable artifact."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import transfer.config as tcfg
import transfer.finetune as ft
from helpers import MULT, make_artifact
from distill.students.artifact import load_student, read_meta
from distill.core.checkpoint import load_checkpoint
from distill.core.errors import UserError

def run(tmp_path, data, *extra, name="run", backbone=None):
    backbone = backbone or str(make_artifact(tmp_path / "student.safetensors"))
    argv = ["--dataset", f"folder:{data}", "--backbone", backbone, "--out-dir", str(tmp_path / name),
            "--epochs", "2", "--batch-size", "8", "--workers", "0", "--no-progress", "--lr", "0.05",
            "-o", "eval.every_epochs=0", "-o", "optim.base_batch=8", *extra]
    return ft.main(argv), tmp_path / name


def cfg_for(*argv):
    return tcfg.check(tcfg.load(tcfg.parse(["--dataset", "folder:unused", "--backbone", "timm:test_resnet", *argv])))


@pytest.fixture(scope="module")
def easy_root(tmp_path_factory):
    """Two classes anyone can tell apart (dark vs bright images, noisy): a working loop must reach 100 %."""
    root = tmp_path_factory.mktemp("easy")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for label, base in (("bright", 200), ("dark", 40)):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def test_matched_decay_and_recommended_multipliers_are_the_defaults(tmp_path):
    _, meta = load_student(make_artifact(tmp_path / "s.safetensors"), num_classes=4)
    res = ft.resolve_defaults(cfg_for(), meta)
    assert res.weight_decay == 3e-5 and res.lr_mult == MULT
    assert "matched" in res.sources["weight_decay"] and "recommended" in res.sources["lr_mult"]
    assert (res.image_size, res.test_size) == (32, 48)
    given = ft.resolve_defaults(cfg_for("--weight-decay", "1e-3", "--lr-mult", "1,1,1,1,1", "--image-size", "64"),
                                meta)
    assert given.weight_decay == 1e-3 and given.lr_mult == [1.0] * 5 and given.test_size == 72   # ~1.15x
    # an artifact without pretrain.weight_decay (a plain timm model) falls back to the documented default
    _, plain = load_student("timm:test_resnet", num_classes=4)
    res = ft.resolve_defaults(cfg_for(), plain)
    assert res.weight_decay == 1e-4 and "default" in res.sources["weight_decay"]
    assert res.lr_mult == [1.0] * 5


def test_multipliers_and_matched_decay_take_effect_in_optimizer_and_weights(tmp_path, demo_root):
    student = make_artifact(tmp_path / "student.safetensors")
    before = load_file(str(student))
    results, out = run(tmp_path, demo_root, "--lr-mult", "0,0.1,0.2,0.2,0.3", backbone=str(student))
    groups = load_checkpoint(out / "checkpoint.pt")["optimizer"]["param_groups"]
    by_name = {g["name"]: g for g in groups}
    assert "stage0" not in by_name and "stage0_no_decay" not in by_name   # multiplier 0: frozen, not optimized
    for g in groups:
        expected = 1.0 if g["name"].startswith("head") else [0, 0.1, 0.2, 0.2, 0.3][int(g["name"][5])]
        assert g["initial_lr"] == pytest.approx(0.05 * expected), g["name"]
        assert g["weight_decay"] in (3e-5, 0.0)
    assert by_name["stage4"]["weight_decay"] == 3e-5 and by_name["head"]["weight_decay"] == 3e-5
    assert results["weight_decay"] == 3e-5
    after = load_file(str(out / "model.safetensors"))
    stem = [k for k in before if k.startswith(("conv1", "bn1")) and "num_batches" not in k and "running" not in k]
    assert stem and all(torch.equal(before[k], after[k]) for k in stem)
    assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, demo_root, monkeypatch):
    switches = ["--mixup", "0.4", "--label-smoothing", "0.1", "--workers", "1",  # mixup draws from the torch RNG
                "-o", "run.checkpoint_period=2"]
    student = str(make_artifact(tmp_path / "student.safetensors"))
    full, full_out = run(tmp_path, demo_root, *switches, name="full", backbone=student)

    import distill.core.engine as engine
    real_save, calls = engine.save_checkpoint, []

    def save_then_die(path, state):
        real_save(path, state)
        calls.append(state["engine"]["iteration"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-epoch, right after the second checkpoint
    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, demo_root, *switches, name="cut", backbone=student)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["engine"]
    assert state["epoch"] == 0 and state["batch"] == 4, "the interruption must land mid-epoch"
    resumed, cut_out = run(tmp_path, demo_root, *switches, name="cut", backbone=student)
    a, b = load_file(str(full_out / "model.safetensors")), load_file(str(cut_out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["finetune"] == full["finetune"]
    # another config in the same folder is refused, naming the key; the learning rate may change on resume
    with pytest.raises(UserError, match=r"another config \(loss.label_smoothing: 0.1 -> 0.2"):
        run(tmp_path, demo_root, *switches[:2], "--label-smoothing", "0.2", *switches[4:], name="cut",
            backbone=student)


@pytest.mark.parametrize("bn_stats", [False, True])
def test_fix_updates_only_the_classifier_and_optionally_bn_statistics(tmp_path, demo_root, bn_stats):
    tuned = make_artifact(tmp_path / "tuned.safetensors", num_classes=4)  # as if fine-tuned on these 4 classes
    extra = ["--fix-bn"] if bn_stats else []
    results, fix_out = run(tmp_path, demo_root, "--epochs", "0", "--fix", "--fix-epochs", "2", "--fix-lr", "0.1",
                           *extra, name="fix", backbone=str(tuned))
    before, after = load_file(str(tuned)), load_file(str(fix_out / "model_fix.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    running = {k for k in before if "running_" in k}
    assert {"fc.weight", "fc.bias"} <= changed
    assert changed - {"fc.weight", "fc.bias"} - {k for k in before if "num_batches" in k} == (running if bn_stats else set())
    assert results["test_size"] == 48 and "before_fix" in results and "fix" in results
    meta = read_meta(fix_out / "model_fix.safetensors")
    assert meta["transfer"]["fix"] and meta["transfer"]["fix_bn_stats"] == bn_stats


def test_finetune_learns_and_reports_both_resolutions_and_an_artifact(tmp_path, easy_root):
    results, out = run(tmp_path, easy_root, "--epochs", "3", "--lr", "0.1", "--image-size", "32",
                       backbone="timm:test_resnet")
    assert results["finetune"]["score"] == 100.0 and results["finetune"]["score_test_size"] == 100.0
    assert (results["train_size"], results["test_size"]) == (32, 36)   # about 1.15x (default_test_size)
    model, meta = load_student(out / "model.safetensors")
    assert meta["num_classes"] == 2 and meta["transfer"]["dataset"] == f"folder:{easy_root}"
    assert meta["preprocessing"]["input_size"] == 32 and meta["preprocessing"]["test_input_size"] == 36
    assert json.loads((out / "results.json").read_text())["finetune"]["score"] == 100.0
    assert (out / "metrics.csv").is_file() and (out / "metrics.png").is_file()


def test_bad_input_is_one_clear_error(tmp_path, demo_root, capsys):
    with pytest.raises(UserError, match="multiplier list"):
        cfg_for("--lr-mult", "0.1,0.2")
    with pytest.raises(UserError, match="did you mean 'optim.lr'"):
        cfg_for("-o", "optim.lrr=0.1")
    with pytest.raises(UserError, match="no dataset"):
        tcfg.check(tcfg.load(tcfg.parse(["--backbone", "timm:test_resnet"])))
    with pytest.raises(SystemExit) as e:
        ft.run_cli(ft.main, ["--dataset", "flowers102", "--backbone", "timm:test_resnet",
                             "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "flowers-102" in capsys.readouterr().err
