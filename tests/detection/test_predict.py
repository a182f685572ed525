"""detection.predict: output names never collide, labels sit on a filled tag sized to the image."""
import shutil

import numpy as np
import torch
from PIL import Image

from detection.predict import PALETTE, draw_detections, output_names, predict_images


class FixedDetector(torch.nn.Module):
    """One box of class 1 over the left half: what is drawn, not what is detected, is under test."""

    def forward(self, images):
        _, h, w = images[0].shape
        return [dict(boxes=torch.tensor([[2.0, 2.0, w / 2, h - 2.0]]), scores=torch.tensor([0.9]),
                     labels=torch.tensor([1]))]


def test_names_keep_the_stem_and_tell_same_named_inputs_apart(tmp_path):
    assert output_names(["x/cat.jpg", "y/dog.jpg"]) == ["cat.png", "dog.png"]
    assert output_names(["/d/a/img.jpg", "/d/b/img.jpg", "/e/a/img.jpg"]) == ["d_a_img.png", "b_img.png", "e_a_img.png"]
    assert output_names(["/d/img.jpg", "/d/img.png", "/d/img.jpg"]) == ["img_jpg.png", "img_png.png", "img_jpg.png"]
    names = output_names(["/d/Photo.jpg", "/d/photo.jpg", "/d/photo.JPG"])   # clash on a case-blind disk too
    assert len({n.lower() for n in names}) == 3


def test_two_inputs_with_one_file_name_write_two_pngs(tmp_path, demo_root):
    source = sorted((demo_root / "val").rglob("*.jpg"))[:2]
    inputs = []
    for folder, src in zip(("a", "b"), source):
        (tmp_path / folder).mkdir()
        inputs.append(tmp_path / folder / "img.jpg")
        shutil.copy(src, inputs[-1])
    written, failed = predict_images(FixedDetector(), inputs + inputs[:1], tmp_path / "out", ["circle"])
    assert failed == [] and sorted(p.name for p in written) == ["a_img.png", "b_img.png"]
    for png, src in zip(sorted(written), source):        # each PNG is its own input, boxes drawn on it
        drawn, original = np.asarray(Image.open(png)), np.asarray(Image.open(src))
        assert drawn.shape == original.shape and np.abs(drawn.astype(int) - original).mean() > 1


def test_label_sits_on_a_filled_tag_as_tall_as_the_image_needs():
    for size, min_rows in ((96, 10), (640, 14)):
        image = torch.full((3, size, size), 128, dtype=torch.uint8)
        det = FixedDetector()([image.float()])[0]
        drawn = draw_detections(image, det, ["circle"], 0.3).permute(1, 2, 0).numpy()
        fill = tuple(int(PALETTE[0][i:i + 2], 16) for i in (1, 3, 5))
        filled = np.all(drawn[: size // 3, : size // 2] == fill, axis=-1).sum(axis=1)
        rows = np.flatnonzero(filled > size // 10)                # the box's top edge and the tag below it
        assert rows.max() - rows.min() + 1 >= min_rows            # a tag as tall as the text needs
        ink = drawn[rows.min():rows.max() + 1, : size // 2]
        assert (ink[..., 1] > 200).sum() > 20                     # white text on the red tag (its green is 25)
