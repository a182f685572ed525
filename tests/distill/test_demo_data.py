"""The demo-data generator: layout, determinism, COCO validity, box tightness, CLI."""
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.core import demo_data, demo_scenes
from distill.core.demo_data import generate
from distill.core.demo_scenes import SHAPES, Fill, Scene, SceneObject, labeled_scene, object_mask, render_scene
from distill.core.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[2]
TINY = dict(num_classes=3, train_per_class=4, val_per_class=2, image_size=64, seed=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, generate(out, unlabeled=3, **TINY)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _changed_box(a, b):
    """(x0, y0, x1, y1) of the pixels where two renders differ, x1/y1 exclusive."""
    ys, xs = np.nonzero(np.any(np.asarray(a) != np.asarray(b), axis=2))
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_layout_and_counts(demo):
    out, summary = demo
    classes = (out / "classes.txt").read_text().split()
    assert classes == sorted(SHAPES[:3]) == summary["classes"]
    for split, per_class in (("train", 4), ("val", 2)):
        for name in classes:
            assert len(list((out / split / name).glob("*.jpg"))) == per_class
        assert summary[split]["images"] == 3 * per_class
        assert (out / "annotations" / f"instances_{split}.json").is_file()
    assert len(list((out / "unlabeled").glob("*.jpg"))) == 3 == summary["unlabeled"]["images"]
    with Image.open(next((out / "train").rglob("*.jpg"))) as im:
        assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"


def test_same_seed_gives_identical_bytes_other_seed_differs(demo, tmp_path):
    out, _ = demo
    generate(tmp_path / "again", unlabeled=3, **TINY)
    assert _files(tmp_path / "again") == _files(out)
    generate(tmp_path / "other", unlabeled=3, **{**TINY, "seed": 1})
    first, other = _files(out), _files(tmp_path / "other")
    jpgs = [k for k in first if k.endswith(".jpg")]
    assert sorted(jpgs) == sorted(k for k in other if k.endswith(".jpg"))
    assert all(first[k] != other[k] for k in jpgs)


def test_coco_json_is_valid_for_pycocotools_and_boxes_lie_inside_images(demo):
    from pycocotools.coco import COCO
    out, summary = demo
    for split in ("train", "val"):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == summary["classes"]
        assert sorted(coco.getImgIds()) == list(range(1, summary[split]["images"] + 1))
        assert len(coco.getAnnIds()) == summary[split]["objects"]
        for img in coco.loadImgs(coco.getImgIds()):
            assert (out / img["file_name"]).is_file()
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 3
            main_class = img["file_name"].split("/")[1]
            assert coco.cats[anns[0]["category_id"]]["name"] == main_class      # main object first
            assert all(a["category_id"] != anns[0]["category_id"] for a in anns[1:])
            for a in anns:
                x, y, w, h = a["bbox"]
                assert a["category_id"] in coco.cats and a["iscrowd"] == 0
                assert 0 <= x and 0 <= y and w > 0 and h > 0
                assert x + w <= img["width"] and y + h <= img["height"]
                assert 0 < a["area"] <= w * h


def test_every_box_is_exactly_the_pixels_its_object_changes(demo):
    """Re-render each image with one object removed: the changed pixels must span exactly its COCO box.

    Fails if a box is offset, scaled or clipped differently from the drawing; the byte comparison ties
    the re-rendered scene to the file on disk.
    """
    out, summary = demo
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    anns = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    checked = 0
    for img in coco["images"]:
        label = summary["classes"].index(img["file_name"].split("/")[1])
        index = (img["id"] - 1) % TINY["train_per_class"]
        scene = labeled_scene(0, "train", label, index, summary["classes"], 64)
        full = render_scene(scene)
        buf = io.BytesIO()
        full.save(buf, format="JPEG", quality=scene.jpeg_quality)
        assert buf.getvalue() == (out / img["file_name"]).read_bytes()
        assert len(scene.objects) == len(anns[img["id"]])
        for k, ann in enumerate(anns[img["id"]]):
            x, y, w, h = ann["bbox"]
            assert _changed_box(full, render_scene(scene.without(k))) == (x, y, x + w, y + h)
            checked += 1
    assert checked > len(coco["images"])          # some distractors were checked too


def test_box_of_a_placed_shape_matches_its_geometry():
    """Independent of the renderer: a square of half-side 10 at (32, 20) spans x 22..42, y 10..30.

    Edge pixels are anti-aliased, so the box (every pixel the shape touches) may reach one pixel out.
    """
    black = Fill("solid", ((0, 0, 0), (0, 0, 0)), 0.0, 1.0, 0.0, 0)
    white = Fill("solid", ((255, 255, 255), (255, 255, 255)), 0.0, 1.0, 0.0, 0)
    square = SceneObject("square", (32.0, 20.0), 10 * 2 ** 0.5, 0.0, 1.0, white, None)
    box = object_mask(square, 64).getbbox()
    assert np.abs(np.subtract(box, (22, 10, 42, 30))).max() <= 1
    x0, y0, x1, y1 = box
    pixels = np.asarray(render_scene(Scene(64, black, (), (dataclasses.replace(square, box=box),), 90)))
    assert (pixels[11:29, 23:41] == 255).all()                    # interior fully covered
    outside = pixels.copy()
    outside[y0:y1, x0:x1] = 0
    assert not outside.any()
    touched = pixels[y0:y1, x0:x1].any(axis=2)
    assert touched.any(axis=0).all() and touched.any(axis=1).all()  # every row and column of the box is used


def test_imagefolder_reads_train_split_with_list_file_labels(demo):
    from torchvision.datasets import ImageFolder
    out, summary = demo
    ds = ImageFolder(str(out / "train"))
    assert ds.classes == summary["classes"] and len(ds) == 12
    from_list = {}
    for line in (out / "train_list.txt").read_text().splitlines():
        rel, label = line.split(" ")
        from_list[str(out / rel)] = int(label)
    assert dict(ds.samples) == from_list


def test_list_files_match_folders(demo):
    out, summary = demo
    for split in ("train", "val"):
        lines = (out / f"{split}_list.txt").read_text().splitlines()
        listed = {}
        for line in lines:
            rel, label = line.split(" ")
            listed[rel] = int(label)
            assert summary["classes"][int(label)] == rel.split("/")[1]
        on_disk = {p.relative_to(out).as_posix() for p in (out / split).rglob("*.jpg")}
        assert set(listed) == on_disk and len(lines) == len(on_disk)
    unlabeled = (out / "unlabeled_list.txt").read_text().splitlines()
    assert unlabeled == sorted(p.relative_to(out).as_posix() for p in (out / "unlabeled").glob("*.jpg"))
    assert all(" " not in line for line in unlabeled)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "distill.demo_data", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_data_and_prints_summary(tmp_path):
    r = _cli(tmp_path / "d", "--classes", 2, "--train-per-class", 2, "--val-per-class", 1,
             "--image-size", 48, "--seed", 3, "--unlabeled", 2)
    assert r.returncode == 0, r.stderr
    assert "2 classes (circle, square)" in r.stdout and "train: 4 images" in r.stdout
    assert "val: 2 images" in r.stdout and "unlabeled: 2 images" in r.stdout
    assert len(list((tmp_path / "d" / "train").rglob("*.jpg"))) == 4


def test_cli_bad_argument_is_a_clear_error_without_traceback(tmp_path):
    r = _cli(tmp_path / "d", "--classes", 0)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: demo data: num_classes=0, expected an integer in 1..{len(SHAPES)}"
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args, message", [
    (["--classes", len(SHAPES) + 1], f"num_classes={len(SHAPES) + 1}, expected an integer in 1..{len(SHAPES)}"),
    (["--image-size", 8], "image_size=8, expected an integer in 32..1024"),
    (["--train-per-class", 0], "train_per_class=0, expected an integer >= 1"),
    (["--unlabeled", -1], "unlabeled=-1, expected an integer >= 0"),
])
def test_bad_arguments_name_the_value_and_the_expected_range(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        run_cli(demo_data.main, [str(tmp_path / "d"), *map(str, args)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_existing_demo_data_needs_overwrite(demo, tmp_path):
    small = {**TINY, "train_per_class": 1, "val_per_class": 1}
    generate(tmp_path / "d", **small)
    with pytest.raises(UserError, match="overwrite"):
        generate(tmp_path / "d", **small)
    summary = generate(tmp_path / "d", overwrite=True, **{**small, "num_classes": 2})
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == summary["classes"]


# ---------------------------------------------------------------------------------------------------
# Options the one-command demo uses: explicit classes, clutter, labeled subset, an off-topic pool with
# copies of val images, presets.

def test_explicit_shapes_make_a_task_with_other_classes(tmp_path):
    s = generate(tmp_path / "d", shapes=["heart", "arrow"], train_per_class=2, val_per_class=1, image_size=32)
    assert s["classes"] == ["arrow", "heart"] == (tmp_path / "d" / "classes.txt").read_text().split()
    coco = json.loads((tmp_path / "d" / "annotations" / "instances_train.json").read_text())
    assert {c["name"] for c in coco["categories"]} == {"arrow", "heart"}
    assert not set(s["classes"]) & set(SHAPES[:8])          # none of the default 8 pretraining classes


def test_clutter_zero_removes_distractors_lines_and_patterns():
    classes = sorted(SHAPES[:8])
    clean = [labeled_scene(0, "train", k % 8, k, classes, 32, clutter=0.0) for k in range(40)]
    full = [labeled_scene(0, "train", k % 8, k, classes, 32) for k in range(40)]
    assert all(len(s.objects) == 1 and not s.lines and s.objects[0].fill.kind == "solid" for s in clean)
    assert all(s.objects[0].fill.noise == 0 and s.background.noise == 0 for s in clean)
    assert sum(len(s.objects) > 1 for s in full) > 5 and sum(bool(s.lines) for s in full) > 5


def test_labeled_subset_is_the_first_n_of_each_class(tmp_path):
    s = generate(tmp_path / "d", num_classes=3, train_per_class=5, labeled_per_class=2, val_per_class=1,
                 image_size=32)
    train = (tmp_path / "d" / "train_list.txt").read_text().splitlines()
    labeled = (tmp_path / "d" / "labeled_list.txt").read_text().splitlines()
    assert labeled == [line for k, line in enumerate(train) if k % 5 < 2] and s["labeled"]["images"] == 6
    assert [int(line.split()[1]) for line in labeled] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(UserError, match="labeled_per_class=6"):
        generate(tmp_path / "e", num_classes=3, train_per_class=5, labeled_per_class=6, image_size=32)


def test_pool_holds_off_topic_scenes_and_mirrored_val_copies(tmp_path):
    out = tmp_path / "d"
    s = generate(out, num_classes=4, train_per_class=1, val_per_class=3, image_size=32, unlabeled=40,
                 unlabeled_empty=0.5, val_copies=4, seed=5)
    pool = (out / "unlabeled_list.txt").read_text().splitlines()
    copies = [p for p in pool if Path(p).stem.startswith("copy_")]
    assert len(pool) == 44 == s["unlabeled"]["images"] and len(copies) == 4
    assert pool.index(copies[1]) > 5 and pool.index(copies[-1]) < 40     # spread through the pool, not appended
    off = [demo_scenes.is_off_topic(5, i, 0.5) for i in range(40)]
    assert s["unlabeled"]["off_topic"] == sum(off) and 10 < sum(off) < 30
    for i in range(40):
        scene = demo_scenes.unlabeled_scene(5, i, s["classes"], 32, empty=0.5)
        with_main = demo_scenes.unlabeled_scene(5, i, s["classes"], 32)
        assert scene.objects == (with_main.objects[1:] if off[i] else with_main.objects)
    val = {p.relative_to(out).as_posix(): p for p in (out / "val").rglob("*.jpg")}
    classes_copied = set()
    for rel in copies:   # each copy is some val image mirrored (JPEG noise aside), from every class
        copy = np.asarray(Image.open(out / rel), np.float32)
        errors = {v: np.abs(copy - np.asarray(Image.open(p), np.float32)[:, ::-1]).mean() for v, p in val.items()}
        best = min(errors, key=errors.get)
        assert errors[best] < 12 and sorted(errors.values())[1] > 2 * errors[best]
        classes_copied.add(best.split("/")[1])
    assert len(classes_copied) == 4
    written = json.loads((out / "demo_data.json").read_text())       # written last: the set is complete
    assert written["unlabeled"] == dict(s["unlabeled"], list="unlabeled_list.txt")
    assert written["classes"] == s["classes"] and written["train"]["folder"] == "train"


def test_presets_on_the_command_line_and_flags_override_them(tmp_path):
    r = _cli(tmp_path / "d", "--preset", "downstream", "--train-per-class", 1, "--val-per-class", 1)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "d" / "demo_data.json").read_text())
    assert s["classes"] == sorted(demo_data.PRESETS["downstream"]["shapes"]) and s["train"]["images"] == 4
    assert s["image_size"] == demo_data.PRESETS["downstream"]["image_size"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(shapes=["circle", "blob"]), "shapes="), (dict(shapes=["ring", "ring"]), "shapes="),
    (dict(clutter=1.5), "clutter=1.5"), (dict(unlabeled_empty=-0.1), "unlabeled_empty=-0.1"),
    (dict(val_copies=99), "val_copies=99"),
])
def test_bad_demo_options_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(tmp_path / "d", **{**TINY, **kwargs})
