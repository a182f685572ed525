"""The step runner under `distill.chain` and `distill.demo`: outputs exist => skipped, --force, --until,
timings, a quiet log.

A step is a callable plus the files it must leave behind. Rerunning a chain skips every step whose outputs
exist (and keeps the time it took when it ran, read from the previous summary.json), so an interrupted
chain continues where it stopped; each trainer also resumes its own checkpoint inside a step. A step that
raises leaves its outputs as they were: its trainer's checkpoint is what the rerun resumes from.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

from distill.core.errors import UserError


class Until(Exception):
    """Raised by `StepRunner.step` after the step named by --until: the chain stops there, cleanly."""


class StepRunner:
    """Runs steps in order; a step whose outputs exist is skipped unless `force`. `tag` prefixes the console
    lines; with `quiet` the trainers' own output goes to OUT/`log_name`."""

    def __init__(self, out: Path, *, force: bool = False, quiet: bool = False, until: str | None = None,
                 tag: str = "chain", log_name: str = "chain.log"):
        self.out, self.force, self.quiet, self.until, self.tag = Path(out), force, quiet, until, tag
        self.log = self.out / log_name
        self.status: dict[str, dict] = {}
        try:
            self.previous = json.loads((self.out / "summary.json").read_text()).get("steps", {})
        except (OSError, ValueError):
            self.previous = {}

    def say(self, text: str) -> None:
        print(f"[{self.tag}] {text}", file=sys.stderr, flush=True)

    def step(self, name: str, outputs: list[Path], run, folders=()) -> None:
        """Run `run()` unless every output exists; --force first removes `folders` (the step's own)."""
        done = all(Path(p).exists() for p in outputs)
        if done and not self.force:
            # the time it took when it ran (an earlier summary.json), so the report keeps the chain's cost
            self.status[name] = dict(status="skipped", seconds=self.previous.get(name, {}).get("seconds", 0.0))
            self.say(f"{name}: done before, skipped ({outputs[0]})")
        else:
            self._run(name, outputs, run, folders)

    def note(self, name: str, status: str, why: str) -> None:
        """A step that has nothing to do (no pool, a teacher used as given): recorded and said, not run."""
        self.status[name] = dict(status=status, seconds=0.0, why=why)
        self.say(f"{name}: {status} ({why})")

    def reached(self, name: str) -> None:
        """Call after the step (or group of steps) that --until may name: raises Until there."""
        if self.until == name:
            raise Until(name)

    def _run(self, name, outputs, run, folders) -> None:
        if self.force:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
        self.say(f"{name} ...")
        start = time.perf_counter()
        with self.silenced():
            run()
        missing = [p for p in outputs if not Path(p).exists()]
        if missing:
            raise UserError(f"step {name} finished without writing {missing[0]}")
        seconds = time.perf_counter() - start
        self.status[name] = dict(status="ran", seconds=round(seconds, 1))
        self.say(f"{name}: {seconds:.0f} s")

    @contextlib.contextmanager
    def silenced(self):
        """quiet: the trainers' console output goes to the log file instead."""
        if not self.quiet:
            yield
            return
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield
        finally:
            with open(self.log, "a") as log:
                log.write(buffer.getvalue())

    def seconds(self) -> float:
        return round(sum(v["seconds"] for v in self.status.values()), 1)


def set_threads(threads: int | None) -> None:
    """Small models on few cores: more compute threads than free cores only make them wait on each other.
    Default: $OMP_NUM_THREADS when set, else one less than the cores (a data loader decodes on the last)."""
    import torch
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)


def overrides(values) -> list[str]:
    """['a=1', 'b=2'] -> ['-o', 'a=1', '-o', 'b=2']: the trainers' -o grammar."""
    return [a for o in values for a in ("-o", o)]
