"""Draw a trained detector's boxes, class names and scores on images, one PNG per image.

    python -m detection.predict --checkpoint runs/detection/demo/model_final.pt IMAGE [IMAGE ...] --out-dir preds
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from distill.core.errors import UserError, run_cli

from .data import read_image

DEFAULT_SCORE_THRESH = 0.3
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075", "#a9a9a9"]


def draw_detections(image: torch.Tensor, det: dict, class_names, score_thresh: float = DEFAULT_SCORE_THRESH):
    """uint8 (3, H, W) with each detection above `score_thresh` boxed and labelled "name 0.93"."""
    keep = det["scores"] >= score_thresh
    boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
    if not len(boxes):
        return image
    text = [f"{class_names[int(c) - 1]} {float(s):.2f}" for c, s in zip(labels, scores)]
    colors = [PALETTE[(int(c) - 1) % len(PALETTE)] for c in labels]
    width = max(1, round(max(image.shape[-2:]) / 200))
    return draw_bounding_boxes(image, boxes, labels=text, colors=colors, width=width)


@torch.no_grad()
def predict_images(model, paths, out_dir, class_names, device="cpu", score_thresh: float = DEFAULT_SCORE_THRESH):
    """Run the model on each image file and write OUT_DIR/<stem>.png.
    Returns (written PNG paths, input paths that did not decode)."""
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    for path in paths:
        try:
            image = read_image(path)
        except (OSError, ValueError):
            failed.append(path)
            continue
        det = model([image.to(device).float().div_(255)])[0]
        target = out_dir / f"{Path(path).stem}.png"
        drawn = draw_detections(image, det, class_names, score_thresh)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    return written, failed


def main(argv=None):
    from .model import load_detector

    parser = argparse.ArgumentParser(prog="python -m detection.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model_final.pt or checkpoint.pt from detection.train")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--out-dir", default="predictions", help="where the PNGs go (default: ./predictions)")
    parser.add_argument("--score-thresh", type=float, default=DEFAULT_SCORE_THRESH,
                        help=f"draw detections scoring at least this (default {DEFAULT_SCORE_THRESH})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise UserError(f"image not found: {', '.join(missing[:5])}")
    model, ckpt = load_detector(args.checkpoint, args.device)
    written, failed = predict_images(model, args.images, args.out_dir, ckpt["classes"], args.device,
                                     args.score_thresh)
    print(f"wrote {len(written)} PNG(s) to {args.out_dir}/")
    if failed:
        raise UserError(f"{len(failed)} of {len(args.images)} image(s) could not be decoded: {', '.join(failed[:5])}")


if __name__ == "__main__":
    run_cli(main)
