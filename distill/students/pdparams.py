"""Read PaddlePaddle `.pdparams` files without executing anything they contain.

`paddle.save(state_dict)` pickles a plain dict of numpy arrays (protocol 4 by default, 2..4 allowed),
plus a `StructuredToParameterName@@` table of internal parameter names; Paddle 2.1 stored each tensor as
a `(name, array)` tuple, and protocols 2/3 split arrays over 1 GiB into `key@@.i` slices listed under
`UnpackBigParamInfor@@`. A pickle can call any importable function, so the unpickler here admits only
numpy array reconstruction and plain containers; everything else is refused before it runs.
"""
from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np

from distill.core.errors import UserError

PARAM_NAME_TABLE = "StructuredToParameterName@@"  # paddle.framework.io: structured -> internal names
BIG_PARAM_INFO = "UnpackBigParamInfor@@"  # paddle.framework.io_utils: arrays sliced for protocol < 4


class PdparamsError(UserError, ValueError):
    """A .pdparams file that is missing, not a Paddle state dict, or holds more than numpy arrays."""


def _numpy_core():
    return np._core if hasattr(np, "_core") else np.core  # numpy >= 2 renamed numpy.core


def _admitted_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object that a numpy-array pickle may reference, for numpy 1.x and 2.x writers."""
    core = _numpy_core()
    admitted = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("builtins", "tuple"): tuple,
        ("__builtin__", "dict"): dict,  # protocol 2 writers name builtins the Python 2 way
        ("__builtin__", "list"): list,
        ("__builtin__", "tuple"): tuple,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): __import__("_codecs").encode,  # protocol 2 pickles bytes as encode(str, latin1)
    }
    for module in ("numpy.core", "numpy._core"):
        admitted[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        admitted[(f"{module}.multiarray", "scalar")] = core.multiarray.scalar
        if hasattr(core.numeric, "_frombuffer"):  # protocol 5 array pickles
            admitted[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return admitted


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source
        self._admitted = _admitted_globals()

    def find_class(self, module, name):
        try:
            return self._admitted[(module, name)]
        except KeyError:
            raise PdparamsError(f"refusing to load {module}.{name} from {self._source}: only numpy arrays "
                                "and plain containers are admitted in a .pdparams file") from None

    def persistent_load(self, pid):
        raise PdparamsError(f"refusing persistent id {pid!r} in {self._source}: not a paddle.save state dict")


def _as_array(key: str, value, source: str) -> np.ndarray:
    # Paddle 2.1 saved tensors as (name, array) tuples.
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        kind = f"array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise PdparamsError(f"{source}: entry {key!r} is a {kind}, not a numeric array; "
                            "expected a state dict written by paddle.save(model.state_dict(), ...)")
    return value


def _join_big_params(state: dict, source: str) -> dict:
    info = state.pop(BIG_PARAM_INFO, None) or {}
    for key, entry in info.items():
        parts = [state.pop(part) for part in entry["slices"]]
        state[key] = np.concatenate([p.reshape(-1) for p in parts]).reshape(entry["OriginShape"])
    return state


def load_pdparams(path) -> dict[str, np.ndarray]:
    """Structured parameter names (`blocks.0.conv0.conv.weight`) -> numpy arrays, from a .pdparams file."""
    path = Path(path)
    source = path.name
    if not path.is_file():
        raise PdparamsError(f"no such .pdparams file: {path}")
    with path.open("rb") as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0x80:  # every pickle of protocol >= 2 starts with PROTO
            raise PdparamsError(f"{path} is not a Paddle .pdparams file (not a pickle); "
                                "expected the output of paddle.save(model.state_dict(), path)")
        f.seek(0)
        try:
            obj = _NumpyOnlyUnpickler(f, source).load()
        except PdparamsError:
            raise
        except Exception as e:  # truncated or corrupt pickles raise many types
            raise PdparamsError(f"{path} could not be read as a .pdparams pickle: "
                                f"{type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise PdparamsError(f"{path} holds a {type(obj).__name__}, not a state dict; "
                            "expected the output of paddle.save(model.state_dict(), path)")
    obj = dict(obj)
    obj.pop(PARAM_NAME_TABLE, None)
    obj = _join_big_params(obj, source)
    return {str(k): _as_array(str(k), v, source) for k, v in obj.items()}
