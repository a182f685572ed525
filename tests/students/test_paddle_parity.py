"""Converted PaddleClas weights give PaddleClas's logits: real paddle + paddleclas models, random weights.

One case per family and width PaddleClas publishes SSLD weights for. Needs the test extra (paddlepaddle,
and paddleclas installed with --no-deps plus the few modules its package __init__ imports). Skipped
where paddle is absent, except under CI (CI=true), which must run it.
"""
import gc
import os
import time

import numpy as np
import pytest
import torch

from distill.students.convert import convert_pdparams, get_paddle_arch

if os.environ.get("CI"):
    import paddle  # CI installs the test extra: a missing paddle must fail, not skip
else:
    paddle = pytest.importorskip("paddle", reason="needs the test extra (paddlepaddle, paddleclas)")

# 200 px: stages see odd sizes (25, 13), which exercises the ceil-mode average-pool shortcut of ResNet_vd
# and the symmetric padding of stride-2 depthwise convs, not only the even 224 path. The big models run
# at 72 px (18, 9, 5, 3 after the stem: odd sizes again) to keep the suite short on two cores.
FULL, SMALL = 200, 72
TOLERANCE = 1e-4

CASES = [  # (PaddleClas module, model name, input px)
    ("resnet", "ResNet18_vd", FULL), ("resnet", "ResNet34_vd", FULL), ("resnet", "ResNet50_vd", FULL),
    ("resnet", "ResNet200_vd", SMALL),
    ("res2net_vd", "Res2Net50_vd_26w_4s", FULL), ("res2net_vd", "Res2Net101_vd_26w_4s", SMALL),
    ("res2net_vd", "Res2Net200_vd_26w_4s", SMALL),
    ("mobilenet_v1", "MobileNetV1", FULL), ("mobilenet_v2", "MobileNetV2", FULL),
    *(("mobilenet_v3", f"MobileNetV3_{size}_{w}", FULL) for size in ("large", "small")
      for w in ("x0_35", "x0_5", "x0_75", "x1_0", "x1_25")),
    *(("pp_lcnet", f"PPLCNet_{w}", FULL) for w in ("x0_25", "x0_35", "x0_5", "x0_75", "x1_0", "x1_5", "x2_0", "x2_5")),
    *(("pp_hgnet_v2", f"PPHGNetV2_B{i}", FULL if i < 4 else SMALL) for i in range(7)),
    ("resnext101_wsl", "ResNeXt101_32x16d_wsl", SMALL),
]
LEGENDARY = {"resnet", "mobilenet_v1", "mobilenet_v3", "pp_lcnet", "pp_hgnet_v2"}


def _paddleclas_model(module_name, paddle_name):
    import importlib

    package = "legendary_models" if module_name in LEGENDARY else "model_zoo"
    module = importlib.import_module(f"paddleclas.ppcls.arch.backbone.{package}.{module_name}")
    # Res2Net/MobileNetV2/ResNeXt name their parameters; a fresh name scope lets one process build several.
    # LazyGuard skips Paddle's initializers (seconds for the big models): _randomize sets every tensor.
    with paddle.utils.unique_name.guard(), paddle.LazyGuard():
        return getattr(module, paddle_name)()


def _randomize(layer, seed):
    """He-scaled conv/linear weights and non-trivial BatchNorm statistics, so every tensor matters."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    state = {}
    for key, value in layer.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith("._variance"):
            array = 0.5 + 1.5 * rng.random(shape, dtype=f32)
        elif key.endswith("._mean") or key.endswith(".bias"):
            array = 0.2 * rng.standard_normal(shape, dtype=f32)
        elif len(shape) == 1:  # BatchNorm scale, PP-HGNetV2 learnable affine scale
            array = 0.5 + rng.random(shape, dtype=f32)
        else:  # conv [out, in/g, kh, kw] or Paddle Linear [in, out]
            fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
            array = rng.standard_normal(shape, dtype=f32) * f32(np.sqrt(2.0 / fan_in))
        state[key] = paddle.to_tensor(array)
    layer.set_state_dict(state)


@pytest.mark.parametrize("module_name,paddle_name,size", CASES, ids=[c[1] for c in CASES])
def test_converted_weights_reproduce_paddleclas_logits(module_name, paddle_name, size, tmp_path):
    start = time.perf_counter()
    paddle.set_device("cpu")
    paddle.seed(0)
    layer = _paddleclas_model(module_name, paddle_name)
    _randomize(layer, seed=0)
    layer.eval()
    weights = tmp_path / f"{paddle_name}.pdparams"
    paddle.save(layer.state_dict(), str(weights))

    x = np.random.default_rng(1).normal(size=(1, 3, size, size)).astype(np.float32)
    with paddle.no_grad():
        expected = layer(paddle.to_tensor(x)).numpy()
    del layer
    gc.collect()

    model, meta = convert_pdparams(weights, paddle_name)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()

    rel = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"{paddle_name} @{size}px: max|torch - paddle| / max|paddle| = {rel:.2e} "
          f"({time.perf_counter() - start:.1f}s)")
    assert got.shape == expected.shape == (1, 1000)
    assert np.abs(expected).max() > 1e-3  # the random weights drive real logits
    assert rel <= TOLERANCE
    assert meta["arch"] == get_paddle_arch(paddle_name).timm_arch
    assert meta["pretrain"]["source"] == "PaddleClas" and meta["pretrain"]["file"] == weights.name
