"""What the chain's report measures itself (the accuracies come from the artifacts' metadata): size and
speed of each model, and the exported student's per-class accuracy and confusion matrix on val.

Speed is measured the way `python -m distill.zoo --bench` measures it (distill.students.zoo_bench: torch's
flop counter for multiply-adds, median times after warm-up) at each model's train resolution, on this
machine's CPU with torch's thread count, at batch 1 (latency) and batch 32 (throughput), in PyTorch
(eval, inference mode) and ONNX Runtime (the graph distill.students.onnx_export writes). The result is one
file, OUT/report/measurements.json, so rerunning the chain reuses it (the "report" step).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from distill.chain.runner import StepRunner
from distill.core.atomic import atomic_write
from distill.core.benchmark import machine_line
from distill.core.image_folder import list_image_folder
from distill.core.images import ListDataset, collate_skipping
from distill.core.metrics import evaluate_classifier
from distill.students.artifact import class_names, load_student
from distill.students.predict import eval_transform
from distill.students.zoo_bench import count_macs, paired_latency

THROUGHPUT_BATCH = 32


def speed(model, size: int, onnx: bool) -> dict:
    """params (M), GMACs, and per runtime the batch-1 latency (ms) and batch-32 throughput (images/s), from
    median wall times of calls alternated between the runtimes (zoo_bench.paired_latency: both see the
    same machine load); the medians of this process's CPU time are kept beside them."""
    model = model.cpu().eval()
    out = dict(size=size, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               gmacs=count_macs(model, size) / 1e9)
    inputs = {1: torch.randn(1, 3, size, size), THROUGHPUT_BATCH: torch.randn(THROUGHPUT_BATCH, 3, size, size)}

    def torch_run(x):
        with torch.inference_mode():
            model(x)

    runs = {("torch", n): (lambda x=x: torch_run(x)) for n, x in inputs.items()}
    with tempfile.TemporaryDirectory(prefix="ssld-chain-onnx-") as tmp:
        if onnx:
            from distill.students.onnx_export import INPUT_NAME, onnx_session, write_onnx
            write_onnx(model, Path(tmp) / "model.onnx", size)
            session = onnx_session(Path(tmp) / "model.onnx")
            runs.update({("onnx", n): (lambda f={INPUT_NAME: x.numpy()}: session.run(None, f))
                         for n, x in inputs.items()})
        timed = paired_latency(runs)
    for (runtime, n), (wall, cpu) in timed.items():
        if n == 1:
            out.update({f"{runtime}_ms": wall, f"{runtime}_cpu_ms": cpu})
        else:
            out.update({f"{runtime}_img_s": n / wall * 1e3, f"{runtime}_cpu_img_s": n / cpu * 1e3 if cpu else None})
    return out


def confusion(model, meta: dict, val: Path, size: int, classes: list[str], workers: int = 0) -> dict:
    """Top-1, mean per-class accuracy and the confusion matrix (rows: true class, columns: predicted) on val
    at `size` through the artifact's test transform."""
    _, samples = list_image_folder(val, classes)
    loader = DataLoader(ListDataset(samples, eval_transform(meta, size)), batch_size=64, num_workers=workers,
                        collate_fn=collate_skipping)
    r = evaluate_classifier(model.cpu(), loader, "cpu", len(classes), confusion=True)
    matrix = r["confusion"].long()
    seen = matrix.sum(1).tolist()
    per_class = [100.0 * c / s if s else None for c, s in zip(matrix.diag().tolist(), seen)]
    return dict(size=size, top1=r["top1"], mean_per_class=r["mean_per_class"], per_class=per_class,
                matrix=matrix.tolist(), images=int(sum(seen)))


def measure(plan, models: dict, exported: Path, onnx: bool) -> dict:
    classes = plan.data.classes
    out = dict(machine=machine_line("cpu"), threads=torch.get_num_threads(), models={})
    for role, source in (*models.items(), ("exported", str(exported / "model.safetensors"))):
        model, meta = load_student(source)
        train_size = int(meta["preprocessing"]["input_size"])
        serving = int(meta["preprocessing"].get("test_input_size") or train_size) if role == "exported" else train_size
        names = class_names(meta)
        if names is not None and names != classes:   # a teacher used as given with its own order: say so
            out.setdefault("warnings", []).append(f"{role} {source}: class names differ from DATA's")
        row = dict(source=source, arch=meta["arch"], evaluated=confusion(model, meta, plan.data.val, serving, classes))
        if role != "exported":
            row["speed"] = speed(model, train_size, onnx)
        out["models"][role] = row
    return out


def measure_step(plan, runner: StepRunner, models: dict, exported: Path) -> dict:
    path = plan.out / "report" / "measurements.json"
    onnx = (exported / "model.onnx").is_file()

    def run():
        result = measure(plan, models, exported, onnx)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))

    runner.step("report", [path], run, folders=[path.parent])
    return json.loads(path.read_text())
