"""Which student to pick: per zoo entry its parameters, multiply-adds and CPU latency at batch 1.

    python -m distill.zoo --bench [--size 224] [--names r50_vd mv3_large] [--threads N]

Multiply-adds are counted, not looked up: torch.utils.flop_counter on one forward at batch 1, which counts
convolutions and matrix products at 2 FLOPs per multiply-add; the table shows GMACs = its count / 2, the
figure torchvision publishes as "GFLOPS" and PaddleClas as "FLOPs" (tests check torchvision's own values).
Latency is the median of single-image forwards after warm-up, PyTorch (eval, inference_mode) and ONNX
Runtime (CPU provider, the graph distill.students.onnx_export writes) at the same thread count, called in
alternating rounds so both see the same machine load: wall time (what a caller waits) and this process's
CPU time (at one thread, what an idle core takes; other jobs on a shared machine inflate only the wall
time). Weights are random: latency and counts do not depend on them.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from distill.core.benchmark import machine_line
from distill.students import zoo
from distill.students.onnx_export import INPUT_NAME, onnx_session, write_onnx

WARMUP = 2
MIN_RUNS, MAX_RUNS, BUDGET_S = 5, 50, 2.0   # at least 5 timed runs, more while under 2 s


@dataclass
class BenchRow:
    name: str
    arch: str
    params_m: float
    gmacs: float
    torch_ms: float
    torch_cpu_ms: float
    onnx_ms: float
    onnx_cpu_ms: float


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-adds of one forward at batch 1 (torch's flop counter counts 2 FLOPs per multiply-add)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


def paired_latency(runs: dict) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) of each callable in `runs`, called in alternating rounds after WARMUP calls."""
    for run in runs.values():
        for _ in range(WARMUP):
            run()
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    start, rounds = time.perf_counter(), 0
    while rounds < MIN_RUNS or (rounds < MAX_RUNS and time.perf_counter() - start < BUDGET_S * len(runs)):
        for key, run in runs.items():
            w, c = time.perf_counter(), time.process_time()
            run()
            wall[key].append(time.perf_counter() - w)
            cpu[key].append(time.process_time() - c)
        rounds += 1
    return {k: (statistics.median(wall[k]) * 1e3, statistics.median(cpu[k]) * 1e3) for k in runs}


def bench_entry(name: str, size: int, threads: int, workdir: Path) -> BenchRow:
    entry = zoo.get_entry(name)
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=1000).eval()
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, size)
    x = torch.randn(1, 3, size, size)
    path = workdir / f"{name}.onnx"
    write_onnx(model, path, size)
    session = onnx_session(path, threads)
    feed = {INPUT_NAME: x.numpy()}

    def torch_forward():
        with torch.inference_mode():
            model(x)

    times = paired_latency({"torch": torch_forward, "onnx": lambda: session.run(None, feed)})
    path.unlink()
    return BenchRow(name, entry.arch, params / 1e6, macs / 1e9, *times["torch"], *times["onnx"])


def run_bench(names, size: int = 224, threads: int | None = None, say=print) -> list[BenchRow]:
    """Bench `names` one after another; say() gets the header, then each table row as it finishes."""
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    for name in names:
        zoo.get_entry(name)   # every name checked before the first minutes-long entry
    say(bench_header(size, threads))
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ssld-zoo-bench-") as tmp:
        for name in names:
            rows.append(bench_entry(name, size, threads, Path(tmp)))
            say(format_row(rows[-1]))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    say(f"\n{len(rows)} entries in {time.perf_counter() - start:.0f} s; load average at the end {load} (wall "
        "times grow with other jobs' load, CPU times far less)")
    return rows


HEADER = ("| name | timm arch | params (M) | GMACs | PyTorch ms | ONNX Runtime ms | PyTorch CPU ms | ONNX Runtime CPU ms |",
          "|---|---|---:|---:|---:|---:|---:|---:|")


def format_row(r: BenchRow) -> str:
    return (f"| {r.name} | {r.arch} | {r.params_m:.2f} | {r.gmacs:.3f} | {r.torch_ms:.2f} | {r.onnx_ms:.2f} | "
            f"{r.torch_cpu_ms:.2f} | {r.onnx_cpu_ms:.2f} |")


def bench_header(size: int, threads: int) -> str:
    return (f"zoo at {size} px, batch 1, {threads} thread(s); GMACs = multiply-adds counted by torch's flop counter "
            f"(its FLOPs / 2); latency = median wall and process-CPU ms after {WARMUP} warm-up runs, PyTorch and "
            f"ONNX Runtime in alternating rounds\n{machine_line('cpu')}\n\n" + "\n".join(HEADER))
