"""COCO box metrics with faster-coco-eval (same numbers as pycocotools, several times faster), and the
inference pass that produces the detections, sharded over DDP ranks and gathered on rank 0."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
import torch.distributed as dist

from distill.core.atomic import atomic_write
from distill.core.distributed import is_distributed
from distill.core.precision import autocast
from distill.core.progress import Progress

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")   # COCOeval stats[0:6], reported in percent


def to_coco_results(detections: list[dict], image_ids, category_ids) -> list[dict]:
    """Model outputs (xyxy boxes, labels 1..K) -> COCO result dicts (xywh, category ids)."""
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().float().cpu().clone()   # a float CPU tensor would be edited in place
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append(dict(image_id=int(image_id), category_id=int(category_ids[label - 1]),
                                bbox=[round(v, 3) for v in box], score=round(float(score), 5)))
    return results


def coco_box_metrics(gt, results: list[dict], backend: str = "faster") -> dict:
    """AP, AP50, AP75, APs, APm, APl (percent) of `results` against `gt` (a COCO json path or dict).
    backend "faster" (faster-coco-eval) or "pycocotools" (the oracle in tests)."""
    if not results:
        return {k: 0.0 for k in METRICS}
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval
        coco_gt = COCO(str(gt) if not isinstance(gt, dict) else gt)
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(str(gt)) if not isinstance(gt, dict) else _pycoco_from_dict(COCO, gt)
    else:
        raise ValueError(f"unknown COCO eval backend {backend!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: 100.0 * max(float(v), 0.0) for k, v in zip(METRICS, evaluator.stats[:6])}


def _pycoco_from_dict(COCO, gt: dict):
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    return coco


def gather_lists(items: list) -> list:
    """Concatenate per-rank lists on every rank (identity in a single process)."""
    if not is_distributed():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


@torch.no_grad()
def predict_batches(model, loader, device, category_ids, amp_dtype=None,
                    progress: bool = True) -> tuple[list[dict], list[str]]:
    """COCO results for this rank's images, and the paths that failed to decode."""
    was_training = model.training
    model.eval()
    results, failed = [], []
    bar = Progress(len(loader.sampler) if hasattr(loader, "sampler") else None, "eval",
                   enabled=progress and (not is_distributed() or dist.get_rank() == 0))
    for images, targets, bad in loader:
        failed += bad
        bar.update(len(images) + len(bad))
        if not images:
            continue
        with autocast(device.type, amp_dtype):
            detections = model([im.to(device, non_blocking=True).float().div_(255) for im in images])
        results += to_coco_results(detections, [int(t["image_id"]) for t in targets], category_ids)
    bar.close()
    model.train(was_training)
    return results, failed


def evaluate(model, loader, device, split, amp_dtype=None, backend: str = "faster", results_path=None) -> dict:
    """COCO metrics over the whole split (every rank runs its shard; every rank gets the numbers)
    plus `images` evaluated and `corrupt` images skipped. `results_path`: also write the detections there."""
    results, failed = predict_batches(model, loader, device, split.category_ids, amp_dtype)
    results, failed = gather_lists(results), gather_lists(failed)
    # Canonical order (COCOeval breaks score ties by input order): the same AP for any number of ranks.
    results.sort(key=lambda r: r["image_id"])
    if results_path and (not is_distributed() or dist.get_rank() == 0):
        atomic_write(results_path, lambda tmp: Path(tmp).write_text(json.dumps(results)))   # never half a file
    metrics = coco_box_metrics(split.json_path, results, backend)
    return dict(metrics, images=len(split) - len(failed), corrupt=len(failed))
