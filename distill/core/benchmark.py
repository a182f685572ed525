"""Benchmark helpers every bench command shares: waiting for the device, and the one machine line that goes
next to every figure in docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def synchronize(device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device=None) -> str:
    """GPU name (CUDA) or CPU model, cores, torch threads, torch and Python versions, and the load average:
    what a figure measured on a shared machine must be read with."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name()}"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{where}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}; load average {load}")
