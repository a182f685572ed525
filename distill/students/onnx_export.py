"""ONNX export of a student, kept only when onnxruntime reproduces PyTorch's outputs.

The graph takes normalised float NCHW images at one resolution (the artifact's test resolution unless
asked otherwise) with a dynamic batch axis, and returns the logits. Its metadata_props carry what a
consumer needs to feed it and read it: `preprocessing` (the artifact's input_size, test_input_size,
crop_pct, mean, std, interpolation, plus `onnx_input_size`, the graph's fixed height = width), `classes`
(JSON list, when the artifact records them), `num_classes`, `arch` and the whole artifact metadata under
`ssld`. Read them with `onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map`.

The export is timm's `onnx_export` with torch.onnx's TorchScript exporter (timm's default; the dynamo
exporter needs onnxscript). timm's own forward check compares to 3 decimals; this one runs onnxruntime
(CPU) on real images through the artifact's test preprocessing and on random batches of 1 and 3 (the
dynamic axis), measures max|onnx - torch| / max|torch|, and refuses the file above 1e-4: it is written
under a temporary name and renamed only once the check passes.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from distill.core.atomic import atomic_write
from distill.core.demo_scenes import SHAPES, labeled_scene, render_scene
from distill.core.errors import UserError
from distill.core.images import UnreadableImage, load_transformed
from distill.students.artifact import class_names
from distill.students.predict import eval_size, eval_transform, image_files

ONNX_FILE = "model.onnx"
TOLERANCE = 1e-4               # max |onnx - torch| / max |torch|, over every checked output
RANDOM_BATCHES = (1, 3)        # 3 differs from the traced batch (2): the batch axis really is dynamic
GENERATED_IMAGES = 4           # demo scenes, when the user gives no --check-images
MAX_CHECK_IMAGES = 16
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
ONNX_SIZE_LIMIT = 2 ** 31      # one protobuf file; larger models need external data, not supported here


class OnnxParityError(UserError):
    pass


def require(module: str):
    """Import onnx / onnxruntime, or say how to install them (they are the optional `onnx` extra)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"ONNX export needs {module}: pip install 'ssld-kit[onnx]' (onnx and onnxruntime)") from None


@dataclass
class Parity:
    max_rel: float             # the largest max|onnx - torch| / max|torch| over the checks
    max_abs: float
    checks: list[str]          # what was compared, for the report line
    skipped: int = 0           # check images that did not decode

    def describe(self) -> str:
        skipped = f" ({self.skipped} unreadable skipped)" if self.skipped else ""
        return (f"max relative difference {self.max_rel:.2e} (max abs {self.max_abs:.2e}) on "
                f"{', '.join(self.checks)}{skipped}")


@contextmanager
def quiet_native_output():
    """Discard what native code prints meanwhile: torch.onnx's TorchScript exporter dumps its whole IR graph
    on stdout when an op fails (its log switch tests a function for truth, so it is always on), and the
    error must stay one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def onnx_metadata(meta: dict, size: int) -> dict[str, str]:
    names = class_names(meta)
    props = {"preprocessing": json.dumps({**meta["preprocessing"], "onnx_input_size": size}),
             "num_classes": str(meta["num_classes"]), "arch": meta["arch"], "ssld": json.dumps(meta)}
    if names is not None:
        props["classes"] = json.dumps(names)
    return props


def write_onnx(model: nn.Module, path, size: int, opset: int | None = None, metadata: dict | None = None) -> None:
    """Export `model` (eval mode) at size x size with a dynamic batch axis to `path`, with `metadata` in its
    metadata_props. No numerical check: `export_onnx` adds it."""
    onnx = require("onnx")
    from timm.utils.onnx import onnx_export

    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if weights >= ONNX_SIZE_LIMIT:
        raise UserError(f"the model's weights take {weights / 2**30:.1f} GiB; a single ONNX file holds at most 2 GiB")
    model.eval()
    with warnings.catch_warnings(), quiet_native_output():   # the exporter's deprecation notice: nothing to act on
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            onnx_export(model, str(path), example_input=torch.randn(2, 3, size, size), check=True, opset=opset,
                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
        except Exception as e:  # torch.onnx and the onnx checker raise many types for an op they cannot take
            reason = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"torch.onnx cannot export this model at {size} px (opset {opset or 'default'}): "
                            f"{type(e).__name__}: {reason}; try another --opset") from None
    graph = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def check_inputs(meta: dict, size: int, images=()) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """(label, batch) pairs to compare on: the real images (the user's, else generated demo scenes) through
    the artifact's test transform at `size`, then random normal batches of 1 and 3. Also the number of
    user images that did not decode."""
    transform = eval_transform(meta, size)
    inputs, skipped = [], 0
    if images:
        files, _ = image_files(images)
        decoded = []
        for f in files[:MAX_CHECK_IMAGES]:
            try:
                decoded.append(load_transformed(str(f), transform))
            except UnreadableImage:
                skipped += 1
        if not decoded:
            raise UserError(f"none of the check images in {', '.join(map(str, images))} could be read")
        inputs.append((f"{len(decoded)} of your images", torch.stack(decoded)))
    else:
        crop_pct = float(meta["preprocessing"].get("crop_pct", 0.875))
        side = max(64, round(size / crop_pct))
        scenes = [render_scene(labeled_scene(0, "val", i % len(SHAPES), i, SHAPES, side)) for i in range(GENERATED_IMAGES)]
        inputs.append((f"{GENERATED_IMAGES} generated demo scenes", torch.stack([transform(s) for s in scenes])))
    generator = torch.Generator().manual_seed(0)
    inputs += [(f"random batch of {n}", torch.randn(n, 3, size, size, generator=generator)) for n in RANDOM_BATCHES]
    return inputs, skipped


def onnx_session(path, threads: int | None = None):
    """An onnxruntime CPU session with default graph optimisations (what a user gets), `threads` intra-op
    threads (default: torch's, so the two runtimes compete on equal terms)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure_parity(model: nn.Module, path, inputs) -> Parity:
    """max|onnx - torch| / max|torch| per input batch (PyTorch in eval mode, float32, CPU); the worst one."""
    model.eval()
    session = onnx_session(path)
    worst_rel = worst_abs = 0.0
    for _, batch in inputs:
        with torch.inference_mode():
            expected = model(batch).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
        if got.shape != expected.shape or not np.isfinite(got).all():
            return Parity(float("inf"), float("inf"), [label for label, _ in inputs])
        diff = float(np.abs(got - expected).max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(float(np.abs(expected).max()), 1e-12))
    return Parity(worst_rel, worst_abs, [label for label, _ in inputs])


def export_onnx(model: nn.Module, meta: dict, path, *, size: int | None = None, check_images=(),
                opset: int | None = None, tolerance: float = TOLERANCE) -> Parity:
    """Write the ONNX model to `path` only if onnxruntime matches PyTorch within `tolerance` (relative);
    otherwise raise OnnxParityError naming the measured difference and leave nothing at `path`."""
    size = eval_size(meta, size)
    model = model.cpu().eval()
    inputs, skipped = check_inputs(meta, size, check_images)
    result = {}

    def write(tmp: str) -> None:
        write_onnx(model, tmp, size, opset, onnx_metadata(meta, size))
        parity = measure_parity(model, tmp, inputs)
        parity.skipped = skipped
        if not parity.max_rel <= tolerance:
            raise OnnxParityError(
                f"ONNX check failed for {meta.get('name') or meta['arch']}: onnxruntime differs from PyTorch by "
                f"{parity.describe()}, above {tolerance:g}; {Path(path).name} was not written. Try another "
                "--opset; an untrained deep network can differ this much through float32 rounding alone, a "
                "trained one points to an op whose ONNX form differs")
        result["parity"] = parity

    atomic_write(path, write)
    return result["parity"]
