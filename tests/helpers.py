"""Helpers shared by the test modules (tiny configs, tiny artifacts); fixtures live in conftest.py."""
import timm
import torch
import yaml

from distill.students.artifact import build_meta, save_student


def tiny_config(tmp_path, demo_root, name="run", **sections):
    """A distill.ssld config dict for a seconds-long CPU run; `sections` deep-update it (e.g. loss=dict(kind='ce'))."""
    cfg = dict(
        run=dict(out_dir=str(tmp_path / name), device="cpu", seed=0, workers=0, checkpoint_period=0,
                 checkpoint_minutes=0.0, log_period=2, progress=False),
        student=dict(arch="timm:test_resnet"),
        teacher=None,
        loss=dict(kind="ce"),
        data=dict(root=str(demo_root), train=[dict(type="folder", path="train")],
                  val=dict(type="folder", path="val"), batch_size=8, input_size=32,
                  test_input_size=40, crop_scale=[0.3, 1.0]),
        optim=dict(name="sgd", lr=0.05, base_batch=8, weight_decay=1e-4),
        schedule=dict(epochs=2, kind="cosine", warmup_epochs=0.5),
        export=dict(name=name),
    )
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) and isinstance(value, dict) else value
    return cfg


def write_config(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


MULT = [0.1, 0.1, 0.2, 0.2, 0.3]


def make_artifact(path, weight_decay=3e-5, mult=MULT, num_classes=10):
    """A tiny 'distilled student' (timm test_resnet) with the metadata a real one carries."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=num_classes)
    meta = build_meta("tiny", num_classes, arch="test_resnet", model=model,
                      preprocessing=dict(input_size=32, test_input_size=48),
                      pretrain=dict(weight_decay=weight_decay, weight_decay_kind="coupled", optimizer="sgd"), recommended=dict(transfer=list(mult)))
    save_student(path, model, meta)
    return path
