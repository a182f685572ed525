"""Training checkpoints: atomic writes, safe loads (weights_only), and the RNG state needed for exact resume."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from distill.core.atomic import atomic_write
from distill.core.errors import UserError


def save_checkpoint(path, state: dict) -> Path:
    """torch.save through a temporary file + rename: a kill mid-write keeps the previous checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def capture_rng() -> dict:
    """Python, numpy and torch RNG states in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = dict(python=list(random.getstate()[1]), python_pos=random.getstate()[2],
                 numpy_keys=torch.from_numpy(np_state[1].astype(np.int64)), numpy_pos=int(np_state[2]),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
