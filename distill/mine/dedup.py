"""Near-duplicates of the evaluation set in an unlabeled pool: teacher-feature candidates, SIFT verification.

A mined pool must not hand the student copies of its test images (PaddleClas removed 4,511 from the SSLD
pool with SIFT). Two stages, both bounded in memory:

1. Candidates: cosine similarity of L2-normalised teacher features (timm pre-logits), one pool batch
   against one chunk of val features at a time; each pool image keeps its `candidates` most similar val
   images at or above `cos`. Never a pool x val matrix.
2. Verification, as PaddleClas did, by local features with a geometric check: SIFT keypoints (OpenCV) on
   both images scaled to `sift_size` px, Lowe's ratio test and mutual nearest neighbours, a RANSAC
   similarity transform (rotation, uniform scale, shift: what cropping and resizing do) with at least
   `min_inliers` inliers; under it the images' band-passed pixels must agree (normalised
   cross-correlation >= `min_ncc`) and so must their colours (`max_colour_diff`). A texture-poor image has
   too few keypoints, so a second hypothesis needs none: the pool image is the val image rescaled (same
   framing), checked by the same correlation.
   SIFT descriptors are not mirror-invariant, so each val image is also matched mirrored (its mirrored
   features join the candidate search too): flipped copies are found. Re-compression only moves keypoints
   and pixels slightly.

    python -m distill.mine dedup --teacher T --pool POOL --against VAL -o pool_kept.txt

Writes the kept list (`relpath [label]`, for file pools), OUT_removed.tsv (pool image, matched val image,
cosine, check, inliers, ncc, mirrored), OUT_removed.png (a contact sheet of removed pairs) and
OUT_summary.json. For a WebDataset pool, give the removed list to mining:
`python -m distill.mine ... --exclude OUT_removed.tsv`. Under torchrun each rank checks its pool shards.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from distill.core.atomic import atomic_write
from distill.data import UNLABELED
from distill.core.images import UnreadableImage, load_rgb
from distill.core.distributed import barrier, cleanup, init_distributed
from distill.core.errors import ArgumentParser, UserError, number_in, run_cli
from distill.core.distributed import gather_objects as gather
from distill.mine.pool import Pool, open_pool, relative_to, shard_loader
from distill.mine.teacher import add_teacher_args, load_mining_teacher, teacher_amp, untrained_teacher
from distill.mine.mining import stem_path, write_list
from distill.core.progress import Progress
from distill.core.precision import AMP_DTYPES, autocast


# ---------------------------------------------------------------------------------------------------
# Stage 1: feature candidates.

@torch.no_grad()
def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised pre-logits features (timm forward_head(pre_logits=True)), float32."""
    feats = model.forward_head(model.forward_features(images), pre_logits=True).float()
    return F.normalize(feats.flatten(1), dim=1)


@dataclass
class ValIndex:
    """Features of the val images and of their mirrors: row 2*i is val image i, row 2*i+1 its mirror."""
    paths: list
    feats: torch.Tensor          # (2 * val, dim), float16 to halve the memory


def build_val_index(val: Pool, model, transform, batch_size, workers, device, amp) -> ValIndex:
    paths, feats = [], []
    for batch in shard_loader(val, range(val.num_shards), transform, batch_size, workers):
        if batch["skipped"]:
            raise UserError(f"val image unreadable: {batch['skipped'][0].reason}")
        if not len(batch["ids"]):
            continue
        images = batch["images"].to(device)
        with autocast(device.type, AMP_DTYPES[amp]):
            f = image_features(model, images)
            f_mirror = image_features(model, images.flip(-1))
        feats.append(torch.stack([f, f_mirror], 1).flatten(0, 1).half().cpu())
        paths += batch["names"]
    return ValIndex(paths, torch.cat(feats))


def top_candidates(feats: torch.Tensor, index: ValIndex, max_candidates: int, threshold: float,
                   chunk: int = 8192) -> list[list[tuple[int, float]]]:
    """For each pool row: up to max_candidates (val image, cosine) pairs with cosine >= threshold, best first.
    An image and its mirror count as one val image (the better cosine). Works on chunk val rows at a time."""
    best_s = torch.full((len(feats), 0), -2.0)
    best_i = torch.zeros((len(feats), 0), dtype=torch.long)
    m = max_candidates * 2   # an image and its mirror may both rank: keep room for both
    for lo in range(0, len(index.feats), chunk):
        sims = feats.cpu() @ index.feats[lo:lo + chunk].float().T
        s = torch.cat([best_s, sims], 1)
        i = torch.cat([best_i, torch.arange(lo, lo + sims.shape[1]).expand(len(feats), -1)], 1)
        top = s.topk(min(m, s.shape[1]), dim=1)
        best_s, best_i = top.values, i.gather(1, top.indices)
    out = []
    for scores, rows in zip(best_s.tolist(), best_i.tolist()):
        seen, found = set(), []
        for s, r in zip(scores, rows):
            if s >= threshold and r // 2 not in seen and len(found) < max_candidates:
                seen.add(r // 2)
                found.append((r // 2, s))
        out.append(found)
    return out


# ---------------------------------------------------------------------------------------------------
# Stage 2: SIFT verification.

@dataclass
class Keypoints:
    rgb: np.ndarray              # the image scaled to sift_size (longer side), uint8
    gray: np.ndarray             # the same, grey
    points: np.ndarray           # (n, 2) float32 keypoint positions in it
    descriptors: np.ndarray      # (n, 128) float32


def band_pass(gray: np.ndarray) -> np.ndarray:
    """Structure between 2 and 8 px: no JPEG noise, no smooth shading (a gradient sky is not evidence)."""
    g = gray.astype(np.float32)
    return cv2.GaussianBlur(g, (0, 0), 2.0) - cv2.GaussianBlur(g, (0, 0), 8.0)


class SiftMatcher:
    """Is a pool image a copy of a val image? Two geometric hypotheses, each confirmed by the pixels:

    - frame: the pool image is the val image rescaled (resized, re-encoded; with the mirrored val image,
      flipped): scaled to the val image's frame, their band-passed pixels correlate (NCC >= `min_ncc`).
      Needs no keypoints, so texture-poor images (a plain shape on a plain background) are covered.
    - sift (PaddleClas's check, for crops, shifts and rotations): SIFT matches (OpenCV; Lowe's ratio test,
      mutual nearest neighbours), a RANSAC similarity transform with >= `min_inliers` inliers and a
      plausible scale; under that transform the band-passed pixels correlate (NCC >= `min_ncc`) and the
      colours agree (median difference of the blurred RGB <= `max_colour_diff`, 0-255). Keypoints and
      edges alone align two different pictures of one flat object (the demo's shapes do it often); a copy
      also keeps its colours. A recoloured or grey copy is therefore caught only by the frame check.
    Val keypoints are cached (LRU)."""

    def __init__(self, size: int = 256, ratio: float = 0.75, min_inliers: int = 4, min_ncc: float = 0.7,
                 max_colour_diff: float = 10.0, ransac_px: float = 4.0, max_scale: float = 6.0,
                 min_overlap: float = 0.2, cache: int = 512):
        self.size, self.ratio, self.min_inliers, self.min_ncc = size, ratio, min_inliers, min_ncc
        self.max_colour_diff = max_colour_diff
        self.ransac_px, self.max_scale, self.min_overlap = ransac_px, max_scale, min_overlap
        self.sift = cv2.SIFT_create(contrastThreshold=0.02)  # OpenCV's 0.04 finds too few on plain images
        self.matcher = cv2.BFMatcher(cv2.NORM_L2)
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache

    def keypoints(self, image: Image.Image, mirror: bool = False) -> Keypoints:
        rgb = np.asarray(image.convert("RGB"))
        if mirror:
            rgb = rgb[:, ::-1]
        scale = self.size / max(rgb.shape[:2])
        rgb = cv2.resize(np.ascontiguousarray(rgb),
                         (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))),
                         interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        kps, desc = self.sift.detectAndCompute(gray, None)
        points = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
        return Keypoints(rgb, gray, points, desc if desc is not None else np.zeros((0, 128), np.float32))

    def val_keypoints(self, path: str, mirror: bool) -> Keypoints:
        key = (path, mirror)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        kp = self.keypoints(load_rgb(path), mirror)
        self.cache[key] = kp
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return kp

    def ncc(self, a: Keypoints, b: Keypoints, transform: np.ndarray) -> float:
        """Normalised cross-correlation of band_pass(a) warped by `transform` and band_pass(b), where they overlap."""
        h, w = b.gray.shape
        warped = cv2.warpAffine(band_pass(a.gray), transform, (w, h), flags=cv2.INTER_LINEAR)
        valid = cv2.warpAffine(np.ones(a.gray.shape, np.float32), transform, (w, h)) > 0.99
        if valid.mean() < self.min_overlap:
            return 0.0
        x, y = warped[valid], band_pass(b.gray)[valid]
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-6))

    def colour_diff(self, a: Keypoints, b: Keypoints, transform: np.ndarray) -> float:
        """Median over the overlap of the mean absolute RGB difference (0-255) of the blurred images."""
        h, w = b.gray.shape
        warped = cv2.warpAffine(cv2.GaussianBlur(a.rgb.astype(np.float32), (0, 0), 2.0), transform, (w, h))
        valid = cv2.warpAffine(np.ones(a.gray.shape, np.float32), transform, (w, h)) > 0.99
        if not valid.any():
            return 255.0
        diff = np.abs(warped - cv2.GaussianBlur(b.rgb.astype(np.float32), (0, 0), 2.0))[valid].mean(1)
        return float(np.median(diff))

    def frame_match(self, a: Keypoints, b: Keypoints) -> dict:
        (ha, wa), (hb, wb) = a.gray.shape, b.gray.shape
        ncc = self.ncc(a, b, np.float32([[wb / wa, 0, 0], [0, hb / ha, 0]]))
        return dict(check="frame", inliers=0, ncc=ncc, duplicate=ncc >= self.min_ncc)

    def sift_match(self, a: Keypoints, b: Keypoints) -> dict:
        found = dict(check="sift", inliers=0, ncc=0.0, duplicate=False)
        if len(a.descriptors) < 2 or len(b.descriptors) < 2:
            return found
        pairs = self.matcher.knnMatch(a.descriptors, b.descriptors, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.ratio * p[1].distance]
        back = {m.queryIdx: m.trainIdx for p in self.matcher.knnMatch(b.descriptors, a.descriptors, k=1)
                for m in p[:1]}
        good = [m for m in good if back.get(m.trainIdx) == m.queryIdx]
        if len(good) < max(2, self.min_inliers):
            return found
        transform, mask = cv2.estimateAffinePartial2D(a.points[[m.queryIdx for m in good]],
                                                      b.points[[m.trainIdx for m in good]], method=cv2.RANSAC,
                                                      ransacReprojThreshold=self.ransac_px)
        if transform is None or mask is None:
            return found
        scale = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
        if not 1 / self.max_scale <= scale <= self.max_scale:
            return found
        transform = transform.astype(np.float32)
        found.update(inliers=int(mask.sum()), ncc=self.ncc(a, b, transform))
        found["duplicate"] = found["inliers"] >= self.min_inliers and found["ncc"] >= self.min_ncc and \
            self.colour_diff(a, b, transform) <= self.max_colour_diff
        return found

    def verify(self, kp: Keypoints, val_path: str) -> dict:
        """The first hypothesis that holds (frame, then sift; the val image, then its mirror), else the best
        failed one: check, inliers, ncc, mirrored, duplicate."""
        best = None
        for check in (self.frame_match, self.sift_match):
            for mirrored in (False, True):
                found = dict(check(kp, self.val_keypoints(val_path, mirrored)), mirrored=mirrored)
                if found["duplicate"]:
                    return dict(found, ncc=round(found["ncc"], 4))
                if best is None or found["ncc"] > best["ncc"]:
                    best = found
        return dict(best, ncc=round(best["ncc"], 4))


# ---------------------------------------------------------------------------------------------------
# The pass over the pool, and its outputs.

def find_duplicates(pool: Pool, shards, index: ValIndex, model, transform, matcher: SiftMatcher, *,
                    cos: float, max_candidates: int, batch_size: int, workers: int, device, amp,
                    progress: bool = False) -> dict:
    """This rank's removed records and counts."""
    removed, counts = [], dict(images=0, candidates=0, skipped=0)
    total = pool.size * len(shards) // max(pool.num_shards, 1) if pool.size else None  # this rank's share
    bar = Progress(total, "dedup", enabled=progress)
    for batch in shard_loader(pool, shards, transform, batch_size, workers, raw=True):
        counts["skipped"] += len(batch["skipped"])
        bar.update(len(batch["ids"]) + len(batch["skipped"]), removed=len(removed))
        if not len(batch["ids"]):
            continue
        with autocast(device.type, AMP_DTYPES[amp]):
            feats = image_features(model, batch["images"].to(device))
        counts["images"] += len(batch["ids"])
        for name, raw, cands in zip(batch["names"], batch["raws"],
                                    top_candidates(feats, index, max_candidates, cos)):
            if not cands:
                continue
            counts["candidates"] += len(cands)
            try:
                keypoints = matcher.keypoints(load_rgb(raw))
            except UnreadableImage:
                continue
            for val_id, cosine in cands:
                match = matcher.verify(keypoints, index.paths[val_id])
                if match.pop("duplicate"):
                    removed.append(dict(pool=name, val=index.paths[val_id], cosine=round(min(cosine, 1.0), 4),
                                        **match))
                    break
    bar.close()
    return dict(removed=removed, counts=counts)


def write_removed(path: Path, removed: list) -> Path:
    """Tab-separated; the first column is what `python -m distill.mine --exclude` reads."""
    lines = ["# pool_image\tval_image\tcosine\tcheck\tinliers\tncc\tmirrored"]
    for r in removed:
        pool = r["pool"] if "#" in r["pool"] else os.path.abspath(r["pool"])  # shard.tar#key stays as is
        lines.append(f"{pool}\t{os.path.abspath(r['val'])}\t{r['cosine']:.4f}\t{r['check']}\t{r['inliers']}"
                     f"\t{r['ncc']:.4f}\t{int(r['mirrored'])}")
    return write_list(path, lines)


def write_kept(path: Path, pool: Pool, removed: list) -> int:
    gone = {r["pool"] for r in removed}
    lines = [relative_to(p, path.parent) + ("" if label == UNLABELED else f" {label}")
             for p, label in pool.samples if p not in gone]
    write_list(path, lines)
    return len(lines)


def contact_sheet(path: Path, removed: list, max_pairs: int = 48, tile: int = 96, columns: int = 3) -> Path | None:
    """Removed pairs side by side (pool image | val image), captioned with cosine, inliers and mirroring."""
    pairs = removed[:max_pairs]
    if not pairs:
        return None
    caption, gap = 14, 8
    cell_w, cell_h = 2 * tile + gap, tile + caption
    rows = -(-len(pairs) // columns)
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap), "white")
    draw = ImageDraw.Draw(sheet)

    def thumb(source):
        try:
            return ImageOps.pad(load_rgb(source), (tile, tile), color=(255, 255, 255))
        except UnreadableImage:
            return Image.new("RGB", (tile, tile), (200, 200, 200))

    for n, r in enumerate(pairs):
        x = gap + (n % columns) * (cell_w + gap)
        y = gap + (n // columns) * (cell_h + gap)
        sheet.paste(thumb(r["pool"]), (x, y))
        sheet.paste(thumb(r["val"]), (x + tile + gap, y))
        how = f"{r['inliers']} inl" if r["check"] == "sift" else "frame"
        flip = " flip" if r["mirrored"] else ""
        draw.text((x, y + tile + 1), f"cos {r['cosine']:.2f} {how} ncc {r['ncc']:.2f}{flip}", fill=(0, 0, 0))
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def check_teacher_is_trained(sources, metas, allowed: bool, loud: bool) -> None:
    """Refuse a teacher without trained weights: its features do not tell images apart, almost every pair
    passes the cosine filter and which copies SIFT gets to see becomes luck."""
    reasons = [r for r in (untrained_teacher(s, m) for s, m in zip(sources, metas)) if r]
    if not reasons:
        return
    why = "; ".join(reasons)
    if not allowed:
        raise UserError(f"dedup needs a trained teacher: {why}. Its features would rank candidates by chance, "
                        "so near-duplicates would be missed; pass a trained artifact or --pretrained, or "
                        "--allow-untrained-teacher to run anyway")
    if loud:
        print(f"WARNING: dedup with an untrained teacher ({why}): candidates are ranked by chance and "
              "near-duplicates will be missed unless every pair is verified (--cos -1)", file=sys.stderr)


def parse_args(argv):
    parser = ArgumentParser(prog="python -m distill.mine dedup", description=__doc__.splitlines()[0])
    add_teacher_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--pool", required=True, help="folder, list file or WebDataset shards")
    parser.add_argument("--against", required=True, help="evaluation images: a folder or list file")
    parser.add_argument("-o", "--out", required=True, help="kept list to write (OUT_removed.tsv/.png beside)")
    parser.add_argument("--cos", type=number_in(float, -1, 1), default=0.8, help="candidate cosine similarity threshold")
    parser.add_argument("--candidates", type=number_in(int, 1), default=5, help="val images verified per pool image, at most")
    parser.add_argument("--ratio", type=number_in(float, 0, 1, low_open=True), default=0.75, help="Lowe's ratio test")
    parser.add_argument("--min-inliers", type=number_in(int, 2), default=4, help="RANSAC inliers a duplicate needs")
    parser.add_argument("--min-ncc", type=number_in(float, -1, 1), default=0.7,
                        help="correlation of the aligned, band-passed images a duplicate needs")
    parser.add_argument("--max-colour-diff", type=number_in(float, 0, 255), default=10.0,
                        help="SIFT check: median RGB difference (0-255) of the aligned, blurred images")
    parser.add_argument("--ransac-px", type=number_in(float, 0, low_open=True), default=4.0, help="RANSAC reprojection threshold (px)")
    parser.add_argument("--sift-size", type=number_in(int, 16), default=256, help="longer side both images are scaled to")
    parser.add_argument("--sheet", type=number_in(int, 0), default=48, help="pairs on the contact sheet")
    parser.add_argument("--allow-untrained-teacher", action="store_true",
                        help="run with a teacher without trained weights (tests, benchmarks): its features "
                             "rank candidates by chance")
    return parser.parse_args(argv)   # ranges are checked by the number_in types, naming the flag


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    pool = open_pool(args.pool, args.shard_size)
    val = open_pool(args.against, args.shard_size, what="--against")
    if val.kind != "files":
        raise UserError("--against must be a folder or a list file (SIFT reads the val images again)")
    dist = init_distributed(args.device)
    try:
        start = time.perf_counter()
        teacher, transform, _, model = load_mining_teacher(args.teacher, args.num_classes, args.input_size,
                                                           args.pretrained)
        check_teacher_is_trained(args.teacher, teacher.metas, args.allow_untrained_teacher, dist.is_main)
        model = model.eval().to(dist.device)
        args.amp = teacher_amp(args.amp, dist.device)
        index = build_val_index(val, model, transform, args.batch_size, args.workers, dist.device, args.amp)
        matcher = SiftMatcher(args.sift_size, args.ratio, args.min_inliers, args.min_ncc, args.max_colour_diff,
                              args.ransac_px)
        if dist.is_main:
            print(f"dedup: {pool.describe()} against {len(index.paths)} val images (+ mirrors); "
                  f"candidates cos >= {args.cos}; SIFT >= {args.min_inliers} inliers, ncc >= {args.min_ncc}",
                  file=sys.stderr)
        part = find_duplicates(pool, pool.shards_of_rank(dist.rank, dist.world_size), index, model, transform,
                               matcher, cos=args.cos, max_candidates=args.candidates, batch_size=args.batch_size,
                               workers=args.workers, device=dist.device, amp=args.amp,
                               progress=dist.is_main and not args.no_progress)
        parts = gather(part)
        if dist.is_main:
            removed = sorted((r for p in parts for r in p["removed"]), key=lambda r: r["pool"])
            counts = {k: sum(p["counts"][k] for p in parts) for k in parts[0]["counts"]}
            removed_path = stem_path(out, "_removed.tsv")
            write_removed(removed_path, removed)
            kept = write_kept(out, pool, removed) if pool.kind == "files" else None
            sheet = contact_sheet(stem_path(out, "_removed.png"), removed, args.sheet)
            summary = dict(pool=args.pool, against=args.against, pool_images=counts["images"],
                           skipped=counts["skipped"], candidate_pairs=counts["candidates"], removed=len(removed),
                           kept=kept, seconds=round(time.perf_counter() - start, 2),
                           settings=dict(cos=args.cos, candidates=args.candidates, ratio=args.ratio,
                                         min_inliers=args.min_inliers, min_ncc=args.min_ncc,
                                         max_colour_diff=args.max_colour_diff, ransac_px=args.ransac_px,
                                         sift_size=args.sift_size))
            atomic_write(stem_path(out, "_summary.json"),
                         lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
            print(f"dedup: {len(removed)} of {counts['images']} pool images are near-duplicates of val images "
                  f"({counts['candidates']} candidate pairs verified) -> removed list {removed_path}"
                  + (f", contact sheet {sheet}" if sheet else "")
                  + (f"; kept {kept} -> {out}" if kept is not None else
                     f"; WebDataset pool: mine with --exclude {removed_path}"))
        barrier()
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)
