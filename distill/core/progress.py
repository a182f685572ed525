"""One progress bar for every long job: items per second and ETA, on the main process only, to stderr.

Trainers count images (so the rate reads img/s whatever the batch size), mining and evaluation count
images, downloads count bytes. tqdm does the drawing; this fixes the one look every CLI shares.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


class Progress:
    """`with Progress(total, "epoch 1/3") as bar: bar.update(len(images), loss=0.3)`; silent when disabled."""

    def __init__(self, total: int | None, desc: str, unit: str = "img", enabled: bool = True, initial: int = 0):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "B",
                            unit_divisor=1024 if unit == "B" else 1000, dynamic_ncols=True, file=sys.stderr,
                            bar_format=BAR_FORMAT if total else None, smoothing=0.1, leave=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                 refresh=False)
        self.bar.update(n)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar (plain print when the bar is off)."""
        (tqdm.write if self.bar is not None else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def track(iterable, desc: str, total: int | None = None, unit: str = "img", enabled: bool = True):
    """Iterate with a bar that advances one unit per item (for loops whose items are single images/files)."""
    with Progress(total if total is not None else _len(iterable), desc, unit, enabled) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def _len(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None
