"""COCO-format loading: malformed annotations rejected with their id, crowd/empty/corrupt images handled,
and a training stream that restarts exactly where it stopped."""
import copy
import json

import pytest
import torch

from distill.core.distributed import DistInfo
from detection.data import (AnnotationError, DetectionDataset, TrainSampler, collate, eval_loader, load_coco,
                            split_paths)


@pytest.fixture
def coco(demo_root):
    return json.loads((demo_root / "annotations" / "instances_train.json").read_text())


def write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d["annotations"][6]["bbox"].__setitem__(2, -3.0), "annotation id 7: bbox"),
    (lambda d: d["annotations"][7].__setitem__("category_id", 99), "annotation id 8: category_id 99"),
    (lambda d: d["annotations"][8].__setitem__("image_id", 12345), "annotation id 9: image_id 12345"),
    (lambda d: d["annotations"][9].__setitem__("bbox", [1, 2, 3]), "annotation id 10: bbox [1, 2, 3]"),
    (lambda d: d["images"][2].__setitem__("file_name", "train/nope.jpg"), "image id 3: file 'train/nope.jpg' not found"),
])
def test_malformed_annotations_are_rejected_naming_the_offending_id(tmp_path, demo_root, coco, breakage, message):
    data = copy.deepcopy(coco)
    breakage(data)
    with pytest.raises(AnnotationError, match="1 problem") as err:
        load_coco(write(tmp_path, data), demo_root)
    assert message in str(err.value)


def test_missing_or_foreign_annotation_file_is_a_clear_error(tmp_path, demo_root):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        load_coco(tmp_path / "nothing.json", demo_root)
    with pytest.raises(AnnotationError, match="not a COCO detection file"):
        load_coco(write(tmp_path, {"images": []}), demo_root)
    with pytest.raises(AnnotationError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_coco(tmp_path / "bad.json", demo_root)


def test_crowd_and_zero_size_boxes_stay_out_of_training_targets(tmp_path, demo_root, coco):
    data = copy.deepcopy(coco)
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    first[0]["iscrowd"] = 1
    data["annotations"].append(dict(id=9999, image_id=1, category_id=1, bbox=[5, 5, 0, 10], area=0, iscrowd=0))
    split = load_coco(write(tmp_path, data), demo_root)
    x, y, w, h = first[0]["bbox"]
    assert len(split.boxes[0]) == len(first) - 1
    assert [x, y, x + w, y + h] not in split.boxes[0].tolist()


def test_images_without_boxes_give_empty_targets(tmp_path, demo_root, coco):
    data = copy.deepcopy(coco)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    split = load_coco(write(tmp_path, data), demo_root)
    image, target, bad = DetectionDataset(split)[1]
    assert bad is None and image.shape == (3, 64, 64)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_corrupt_image_is_skipped_and_reported(tmp_path, demo_root, coco):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    data = copy.deepcopy(coco)
    data["images"][0]["file_name"] = str(tmp_path / "broken.jpg")   # absolute: pathlib joins it as is
    split = load_coco(write(tmp_path, data), demo_root)
    images, targets, bad = collate([DetectionDataset(split)[i] for i in range(3)])
    assert len(images) == len(targets) == 2 and bad == [str(tmp_path / "broken.jpg")]
    _, _, bad = next(iter(eval_loader(split, 4, 0, DistInfo(0, 1, 0, torch.device("cpu")))))
    assert len(bad) == 1


def test_hflip_mirrors_boxes(demo_root):
    split = load_coco(demo_root / "annotations" / "instances_train.json", demo_root)
    image, target, _ = DetectionDataset(split)[(0, False)]
    flipped, target_f, _ = DetectionDataset(split)[(0, True)]
    assert torch.equal(flipped, image.flip(-1))
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    assert target_f["boxes"][0].tolist() == [64 - x1, y0, 64 - x0, y1]


def test_training_stream_restarts_exactly_and_ranks_split_each_epoch():
    full = TrainSampler(10, seed=3, hflip=0.5)
    stream = [item for _, item in zip(range(35), full)]
    resumed = [item for _, item in zip(range(12), TrainSampler(10, seed=3, hflip=0.5, start=23))]
    assert resumed == stream[23:35]
    assert sorted(i for i, _ in stream[:10]) == list(range(10))             # an epoch is a permutation
    assert stream[:10] != stream[10:20]                                       # reshuffled each epoch
    ranks = [[i for _, (i, _) in zip(range(4), TrainSampler(7, seed=3, rank=r, world_size=2))] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(list(range(7)) + [ranks[0][0]])   # padded by wrapping


def test_coco_root_layout_and_missing_data_message(tmp_path):
    assert split_paths({"coco_root": "/c"}, "val") == (
        tmp_path.__class__("/c/annotations/instances_val2017.json"), tmp_path.__class__("/c/val2017"))
    from distill.core.errors import UserError
    with pytest.raises(UserError, match="data.coco_root"):
        split_paths({"coco_root": None, "train_json": None}, "train")


def test_all_crowd_boxes_are_refused_naming_the_counts(tmp_path, demo_root, coco):
    data = copy.deepcopy(coco)
    for a in data["annotations"]:
        a["iscrowd"] = 1
    with pytest.raises(AnnotationError) as err:
        load_coco(write(tmp_path, data), demo_root)
    n = len(data["annotations"])
    assert f"no usable box in {len(data['images'])} images ({n} annotations: {n} iscrowd, 0 of zero size" in str(err.value)
    for a in data["annotations"]:    # zero-size boxes are no better
        a.update(iscrowd=0, bbox=[3, 3, 0, 0])
    with pytest.raises(AnnotationError, match=f"0 iscrowd, {n} of zero size"):
        load_coco(write(tmp_path, data), demo_root)


def test_left_out_boxes_empty_images_and_unused_categories_are_counted(tmp_path, demo_root, coco):
    data = copy.deepcopy(coco)
    data["categories"].insert(0, dict(id=0, name="shapes", supercategory="none"))   # a Roboflow placeholder
    crowd = [a for a in data["annotations"] if a["image_id"] == 1]
    for a in crowd:
        a["iscrowd"] = 1
    data["annotations"].append(dict(id=9999, image_id=2, category_id=1, bbox=[5, 5, 0, 10], area=0, iscrowd=0))
    split = load_coco(write(tmp_path, data), demo_root)
    usable = len(data["annotations"]) - len(crowd) - 1
    assert split.counts == dict(annotations=len(data["annotations"]), crowd=len(crowd), degenerate=1,
                                boxes=usable, images_without_boxes=1)
    assert split.unused_categories == [(0, "shapes")]
    assert split.summary() == (f"ann.json: {len(data['images'])} images, {usable} boxes ({len(crowd)} crowd, "
                               "1 zero-size or outside left out); 1 images without a usable box (background only); "
                               "categories without annotations (still a class of the model): 0 'shapes'")
    clean = load_coco(demo_root / "annotations" / "instances_train.json", demo_root)
    assert clean.unused_categories == [] and "left out" not in clean.summary()


def test_bomb_is_skipped_and_16_bit_is_scaled_by_the_detection_reader(tmp_path, demo_root, coco, monkeypatch):
    import numpy as np
    import PIL.Image
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    PIL.Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    PIL.Image.new("RGB", (400, 400)).save(tmp_path / "bomb.png")
    data = copy.deepcopy(coco)
    data["images"][0]["file_name"] = str(tmp_path / "ramp16.png")
    data["images"][1]["file_name"] = str(tmp_path / "bomb.png")
    split = load_coco(write(tmp_path, data), demo_root)
    image, _, bad = DetectionDataset(split)[0]
    assert bad is None and abs(image.float().mean().item() - 127.5) < 1.5     # not clipped to white
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 20_000)                # 400 x 400 > 2 x the limit
    image, _, bad = DetectionDataset(split)[1]
    assert image is None and bad == str(tmp_path / "bomb.png")
