"""Draw a trained detector's boxes, class names and scores on images, one PNG per image.

    python -m detection.predict --checkpoint runs/detection/demo/model_final.pt IMAGE [IMAGE ...] --out-dir preds

Each PNG is named after its input's stem (photo.jpg -> photo.png); inputs that share a stem get their
parent folders in the name (a/photo.jpg, b/photo.jpg -> a_photo.png, b_photo.png), or their extension when
they share the folder (photo.jpg, photo.png -> photo_jpg.png, photo_png.png), so none overwrites another.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from distill.core.errors import ArgumentParser, UserError, number_in, run_cli

from .data import read_image

DEFAULT_SCORE_THRESH = 0.3
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075", "#a9a9a9"]


def _font() -> str:
    """A scalable TrueType font that ships with matplotlib (a dependency): PIL's default bitmap font is ~10 px."""
    import matplotlib
    return str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")


def _ink(hex_color: str) -> str:
    """Black on light label fills, white on dark ones."""
    r, g, b = (int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def draw_detections(image: torch.Tensor, det: dict, class_names, score_thresh: float = DEFAULT_SCORE_THRESH):
    """uint8 (3, H, W) with each detection above `score_thresh` boxed and labelled "name 0.93" on a filled tag
    in the box's colour, the text sized to the image (10 px at 96 px, 14 at 640)."""
    keep = det["scores"] >= score_thresh
    boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
    if not len(boxes):
        return image
    text = [f"{class_names[int(c) - 1]} {float(s):.2f}" for c, s in zip(labels, scores)]
    colors = [PALETTE[(int(c) - 1) % len(PALETTE)] for c in labels]
    longest = max(image.shape[-2:])
    return draw_bounding_boxes(image, boxes, labels=text, colors=colors, width=max(1, round(longest / 300)),
                               font=_font(), font_size=max(10, round(longest / 45)), fill_labels=True,
                               label_colors=[_ink(c) for c in colors])


def output_names(paths) -> list[str]:
    """One PNG name per input, never the same for two different files (the same file twice: the same name)."""
    files = [Path(p).resolve() for p in paths]
    distinct = list(dict.fromkeys(files))
    depth = dict.fromkeys(distinct, 0)        # parent folders put in front of the stem
    with_ext = dict.fromkeys(distinct, False)  # the extension kept, for same-stem files of one folder

    def name(f: Path) -> str:
        folders = list(f.parent.parts[1:])[len(f.parent.parts) - 1 - depth[f]:] if depth[f] else []
        return "_".join([*folders, f.name.replace(".", "_") if with_ext[f] else f.stem]) + ".png"

    while True:
        groups = defaultdict(list)
        for f in distinct:
            groups[name(f).lower()].append(f)   # lower: a case-insensitive file system clashes too
        changed = False
        for group in (g for g in groups.values() if len(g) > 1):
            for f in group:
                if sum(g.parent == f.parent for g in group) > 1:   # folders cannot tell these apart
                    changed |= not with_ext[f]
                    with_ext[f] = True
                elif depth[f] < len(f.parent.parts) - 1:
                    depth[f] += 1
                    changed = True
        if not changed:
            break
    names, taken = {}, set()
    for f in distinct:                         # a last resort for names that still clash: a counter
        base, n = name(f), 1
        candidate = base
        while candidate.lower() in taken:
            n += 1
            candidate = f"{base[:-4]}-{n}.png"
        taken.add(candidate.lower())
        names[f] = candidate
    return [names[f] for f in files]


@torch.no_grad()
def predict_images(model, paths, out_dir, class_names, device="cpu", score_thresh: float = DEFAULT_SCORE_THRESH):
    """Run the model on each image file and write one PNG per input to OUT_DIR (names from output_names).
    Returns (written PNG paths, input paths that did not decode)."""
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    for path, png_name in zip(paths, output_names(paths)):
        target = out_dir / png_name
        if target in written:   # the same file given twice
            continue
        try:
            image = read_image(path)
        except (OSError, ValueError):
            failed.append(path)
            continue
        det = model([image.to(device).float().div_(255)])[0]
        drawn = draw_detections(image, det, class_names, score_thresh)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    return written, failed


def main(argv=None):
    from .model import load_detector

    parser = ArgumentParser(prog="python -m detection.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="model_final.pt from detection.train (either --engine), or the kit engine's checkpoint.pt")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--out-dir", default="predictions", help="where the PNGs go (default: ./predictions)")
    parser.add_argument("--score-thresh", type=number_in(float, 0, 1), default=DEFAULT_SCORE_THRESH,
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
