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


def label_recipe(tmp_path, demo_root, bn="train", **sections):
    """A distill.relabel / distill.ssld recipe whose teacher is a tiny 4-class artifact: 48 images at batch 8."""
    teacher = tmp_path / "teacher.safetensors"
    if not teacher.exists():
        make_artifact(teacher, num_classes=4)
    sections = {"teacher": dict(models=[str(teacher)], bn=bn), "loss": dict(kind="ssld"), **sections}
    cfg = tiny_config(tmp_path, demo_root, **sections)
    return write_config(tmp_path, cfg, f"recipe_{bn}.yaml")


def run_relabel(config, out, *args):
    from distill.relabel import main
    return main(["-c", config, "--out-dir", str(out), "--no-progress", *args])


def load_recipe(config, *overrides):
    """The checked distill.ssld config of a recipe file, with -o overrides."""
    from distill import ssld
    from distill.core.config import load_config
    return ssld.check(load_config(config, list(overrides), ssld.DEFAULTS, renamed=ssld.RENAMED))


def cache_records(out, manifest, epoch):
    """Every record of one epoch of a label cache, in position order, across shards and writer ranks."""
    import numpy as np
    from distill.label_cache import part_path, read_part
    parts = [read_part(part_path(out, epoch, s, r, manifest["world_size"]))
             for s in range(manifest["shards_per_epoch"]) for r in range(manifest["world_size"])]
    records = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(records["position"])
    return {k: v[order] for k, v in records.items()}


FRUIT = ["zebra", "apple", "mango", "kiwi", "fig", "lime", "pear", "plum"]  # not sorted: order is checked


def make_named_artifact(path, names=FRUIT, winner=5, input_size=32, test_input_size=48):
    """A tiny test_resnet artifact that records class names and whose classifier bias makes class `winner`
    win on any image (its logits still depend on the image through the random weights)."""
    from distill.students.artifact import with_classes

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(names))
    with torch.no_grad():
        model.fc.bias[winner] += 20
    meta = build_meta("tiny_named", len(names), arch="test_resnet", model=model,
                      preprocessing=dict(input_size=input_size, test_input_size=test_input_size))
    save_student(path, model, with_classes(meta, names, "demo/train"))
    return path


# detection.train -o overrides for a seconds-long run on the demo_root fixture's 64 px images (both engines).
DETECTION_TINY = ["model.fpn_channels=32", "model.box_head_dim=128", "model.train_sizes=[64]", "model.test_size=64",
                  "model.max_size=64", "model.roi_batch_per_image=64", "model.rpn_post_nms_train=100",
                  "model.rpn_post_nms_test=100", "run.workers=0", "data.batch_size=4", "schedule.warmup_iters=2",
                  "run.log_period=1", "data.eval_batch_size=8"]
