"""Training checkpoints: atomic writes, safe loads, every rank's RNG, and the one resume policy.

The policy every trainer follows (`open_run`): rerunning the same command resumes from the run folder's
checkpoint; `--restart` discards it; a changed config is refused naming the differing keys, except the
keys a trainer declares safe to change on resume (learning rate, epochs or iterations, logging), which
then take effect.
"""
from __future__ import annotations

import pickle
import random
import sys
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .distributed import barrier
from .errors import UserError


def save_checkpoint(path, state: dict) -> Path:
    """torch.save through a temporary file + rename: a kill mid-write keeps the previous checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True): tensors and plain containers only; anything else is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "This file can still be loaded" in str(e):  # a class torch does not admit
            raise UserError(f"{path} holds Python objects other than tensors and plain containers; it was not "
                            "loaded (only checkpoints written by ssld-kit, or plain state dicts, are read)") from None
        raise UserError(f"cannot read checkpoint {path}: not a torch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # a truncated or foreign file: say which
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "empty or unreadable file"


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


def flat_keys(d: dict, prefix: str = "") -> dict:
    """{"optim.lr": 0.1, ...} of a nested config."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """{dotted key: (saved value, current value)} for every key whose value differs."""
    a, b = flat_keys(saved), flat_keys(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def open_run(path, config: dict, restart: bool, safe_keys=(), is_main: bool = True) -> dict | None:
    """The checkpoint to resume from (None: start fresh), after the resume policy's checks.

    Returns the loaded checkpoint with `changed` = {key: (old, new)} of the safe keys that changed.
    """
    path = Path(path)
    if restart:
        if is_main and path.exists():
            path.unlink()
            print(f"--restart: removed {path}", file=sys.stderr)
        barrier()
        return None
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "engine" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this trainer (no config/engine state); "
                        "pass --restart to discard it, or choose another --out-dir")
    ckpt["changed"] = refuse_changed_config(ckpt["config"], config, safe_keys, path.parent)
    return ckpt


def refuse_changed_config(saved: dict, current: dict, safe_keys, run_folder) -> dict[str, tuple]:
    """The resume policy's check: {key: (old, new)} of the changes, or a UserError naming every change
    outside `safe_keys` (the engine's resume and the detectron2 engine's use it)."""
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items() if k not in safe_keys}
    if refused:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        raise UserError(f"{run_folder} holds a run with another config ({shown}{more}); rerun with the same "
                        f"config to resume, --restart to discard it, or another --out-dir "
                        f"(safe to change on resume: {', '.join(safe_keys)})")
    return changes
