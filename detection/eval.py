"""COCO box AP of a trained detector: the model is rebuilt from the checkpoint alone (either engine's).

    python -m detection.eval --checkpoint runs/detection/demo/model_final.pt
    python -m detection.eval --checkpoint CKPT --coco-root /data/coco            # or --val-json J --val-images D
    torchrun --nproc_per_node 8 -m detection.eval --checkpoint CKPT --coco-root /data/coco

Data defaults to the validation set named in the checkpoint's config. --results writes the detections
as a COCO results json.
"""
from __future__ import annotations


from distill.core.distributed import cleanup, init_distributed
from distill.core.errors import ArgumentParser, number_in, run_cli

from .coco_eval import METRICS, evaluate
from .data import eval_loader, load_coco, split_paths
from .model import load_detector


def main(argv=None) -> dict:
    parser = ArgumentParser(prog="python -m detection.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="model_final.pt from detection.train (either --engine), or the kit engine's checkpoint.pt")
    parser.add_argument("--coco-root", help="folder with val2017/ and annotations/instances_val2017.json")
    parser.add_argument("--val-json", help="any COCO-format annotation file")
    parser.add_argument("--val-images", help="its image folder (default: the json's folder)")
    parser.add_argument("--batch-size", type=number_in(int, 1), default=2, help="images per process and step")
    parser.add_argument("--workers", type=number_in(int, 0), default=2, help="DataLoader workers per process")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", help="also write the detections here (COCO results json)")
    args = parser.parse_args(argv)

    dist = init_distributed(args.device)
    model, ckpt = load_detector(args.checkpoint, dist.device)
    data = dict(ckpt["config"]["data"])
    if args.coco_root or args.val_json:
        data.update(coco_root=args.coco_root, val_json=args.val_json, val_images=args.val_images)
    split = load_coco(*split_paths(data, "val"), category_ids=ckpt["category_ids"])
    if dist.is_main:
        print(split.summary(), flush=True)
    loader = eval_loader(split, args.batch_size, args.workers, dist)
    metrics = evaluate(model, loader, dist.device, split, results_path=args.results)
    if dist.is_main:
        print(f"{split.json_path}: {metrics['images']} images" +
              (f" ({metrics['corrupt']} corrupt, skipped)" if metrics["corrupt"] else ""))
        print("  ".join(f"{k} {metrics[k]:.2f}" for k in METRICS))
    cleanup()
    return metrics


if __name__ == "__main__":
    run_cli(main)
