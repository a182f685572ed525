"""Converted PaddleClas weights give PaddleClas's logits: real paddle + paddleclas models, random weights.

Needs the test extra (paddlepaddle, and paddleclas installed with --no-deps plus the few modules its
package __init__ imports). Skipped where paddle is absent, except under CI (CI=true), which must run it.
"""
import os

import numpy as np
import pytest
import torch

from distill.students.convert import convert_pdparams

if os.environ.get("CI"):
    import paddle  # CI installs the test extra: a missing paddle must fail, not skip
else:
    paddle = pytest.importorskip("paddle", reason="needs the test extra (paddlepaddle, paddleclas)")

# 200 px: stages see odd sizes (25, 13), which exercises the ceil-mode average-pool shortcut of ResNet_vd
# and the symmetric padding of stride-2 depthwise convs, not only the even 224 path.
INPUT_SHAPE = (1, 3, 200, 200)
TOLERANCE = 1e-4


def _paddleclas_model(paddle_name):
    from paddleclas.ppcls.arch.backbone.legendary_models import mobilenet_v3, resnet

    return (getattr(resnet, paddle_name, None) or getattr(mobilenet_v3, paddle_name))()


def _randomize(layer, seed):
    """He-scaled conv/linear weights and non-trivial BatchNorm statistics, so every tensor matters."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in layer.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith("._variance"):
            array = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("._mean") or key.endswith(".bias"):
            array = rng.normal(0.0, 0.2, shape)
        elif len(shape) == 1:  # BatchNorm scale
            array = rng.uniform(0.5, 1.5, shape)
        else:  # conv [out, in/g, kh, kw] or Paddle Linear [in, out]
            fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
            array = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        state[key] = paddle.to_tensor(array.astype(np.float32))
    layer.set_state_dict(state)


@pytest.mark.parametrize("paddle_name,arch", [
    ("ResNet50_vd", "r50_vd"),
    ("MobileNetV3_large_x1_0", "mv3_large"),
    ("MobileNetV3_small_x1_0", "mv3_small"),
])
def test_converted_weights_reproduce_paddleclas_logits(paddle_name, arch, tmp_path):
    paddle.set_device("cpu")
    paddle.seed(0)
    layer = _paddleclas_model(paddle_name)
    _randomize(layer, seed=0)
    layer.eval()
    weights = tmp_path / f"{paddle_name}.pdparams"
    paddle.save(layer.state_dict(), str(weights))

    x = np.random.default_rng(1).normal(size=INPUT_SHAPE).astype(np.float32)
    with paddle.no_grad():
        expected = layer(paddle.to_tensor(x)).numpy()

    model, meta = convert_pdparams(weights, arch)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()

    rel = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"{paddle_name}: max|torch - paddle| / max|paddle| = {rel:.2e}")
    assert got.shape == expected.shape == (1, 1000)
    assert rel <= TOLERANCE
    assert meta["pretrain"]["source"] == "PaddleClas" and meta["pretrain"]["file"] == weights.name
