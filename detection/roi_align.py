"""Multi-level RoIAlign (aligned=True, adaptive sampling: detectron2 ROIAlignV2) as a sparse matrix on the CPU.

RoIAlign is linear in the feature map: each output cell is a fixed weighted sum of at most four pixels per
sample point. Written as a sparse matrix A (one row per RoI cell, one column per pixel), the forward pass
is A @ F and the backward pass A^T @ G, both multithreaded sparse x dense products (MKL). torchvision's CPU
kernels walk the RoIs one by one on one thread and scatter the gradient one sample at a time; on a 640 px
R50-FPN training step they took about 8% of the time at one thread and 15% at two. No library has a
faster CPU RoIAlign, hence this module. The weights are torchvision's `roi_align(..., sampling_ratio=0,
aligned=True)` formula, term for term (tests/detection/test_roi_align.py compares both passes with it).
On CUDA torchvision's kernels are already parallel and are used as they are.
"""
from __future__ import annotations

import warnings

import torch
from torchvision.ops import roi_align


def _axis_weights(start, step, grid: int, length: int, bins: int):
    """Bilinear taps along one axis for n RoIs of `grid` samples per bin: (pixel, weight), each (n, bins, 2 * grid).

    torchvision's arithmetic, operation for operation: sample i of bin p sits at
    start + p * step + (i + 0.5) * step / grid; one outside [-1, length] weighs 0, one past the last pixel
    clamps to it; the two taps are floor(x) and floor(x) + 1 with weights 1 - frac and frac.
    """
    p = torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(grid, device=start.device, dtype=start.dtype)[None, None, :]
    x = start[:, None, None] + p * step[:, None, None] + (i + 0.5) * step[:, None, None] / grid
    inside = (x >= -1) & (x <= length)
    x = x.clamp(min=0)
    low = x.long()
    edge = low >= length - 1
    low = torch.where(edge, length - 1, low)
    frac = torch.where(edge, 0.0, x - low) * inside
    pixels = torch.stack([low, torch.where(edge, low, low + 1)], -1).flatten(2)
    weights = torch.stack([(1 - frac) * inside, frac], -1).flatten(2)
    return pixels, weights


def interpolation_matrix(rois: torch.Tensor, scale: float, shape, output_size: int = 7,
                         select: torch.Tensor | None = None) -> torch.Tensor:
    """CSR matrix (len(rois) * output_size^2, B * H * W): row r * S^2 + ph * S + pw holds the bilinear weights
    of RoI r's cell (ph, pw) over the pixels of image rois[r, 0] in a (B, H, W) map, averaged over the cell's
    ceil(h / S) x ceil(w / S) samples. `rois` are (batch index, x1, y1, x2, y2) in image pixels; rows of
    RoIs outside the boolean `select` stay empty."""
    batch, height, width = shape
    s, device = output_size, rois.device
    rois = rois.float()
    x0, y0 = rois[:, 1] * scale - 0.5, rois[:, 2] * scale - 0.5       # aligned: pixel centres at +0.5
    w, h = rois[:, 3] * scale - 0.5 - x0, rois[:, 4] * scale - 0.5 - y0
    gw, gh = torch.ceil(w / s).long().clamp(min=0), torch.ceil(h / s).long().clamp(min=0)
    if select is not None:
        gw, gh = gw * select, gh * select
    # Row r * S^2 + c holds the 2 gh x 2 gw taps of its cell, so RoI r's entries are one block at `first[r]`.
    taps = 4 * gh * gw
    crow = torch.zeros(len(rois) * s * s + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(taps.repeat_interleave(s * s), 0)
    first = crow[:-1:s * s]
    cols = torch.empty(int(crow[-1]), dtype=torch.int64, device=device)
    values = torch.empty(int(crow[-1]), dtype=rois.dtype, device=device)
    # RoIs with equal sample grids are built together by broadcasting (a few distinct grids per call).
    for a, b in torch.unique(torch.stack([gh, gw], 1)[taps > 0], dim=0).tolist():
        idx = torch.where((gh == a) & (gw == b))[0]
        ypix, wy = _axis_weights(y0[idx], h[idx] / s, a, height, s)
        xpix, wx = _axis_weights(x0[idx], w[idx] / s, b, width, s)
        image = rois[idx, 0].long() * (height * width)
        block = (image[:, None, None, None, None] + (ypix * width)[:, :, None, :, None]
                 + xpix[:, None, :, None, :])                           # (n, ph, pw, y tap, x tap)
        weight = wy[:, :, None, :, None] * wx[:, None, :, None, :] / float(a * b)
        at = first[idx, None] + torch.arange(s * s * 4 * a * b, device=device)
        cols[at] = block.reshape(len(idx), -1)
        values[at] = weight.reshape(len(idx), -1)
    with warnings.catch_warnings():   # "sparse CSR support is in beta": the two products used here are not
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, (len(rois) * s * s, batch * height * width),
                                       check_invariants=False)


def _pixel_rows(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B * H * W, C): a view when the map is channels_last, else one copy."""
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1]).float()


class _SparsePool(torch.autograd.Function):
    """sum over levels of A_l @ F_l, and A_l^T @ G back into each level's map."""

    @staticmethod
    def forward(ctx, matrices, *maps):
        ctx.matrices, ctx.shapes, ctx.dtypes = matrices, [m.shape for m in maps], [m.dtype for m in maps]
        with torch.autocast(maps[0].device.type, enabled=False):   # sparse products run in float32
            out = None
            for a, fmap in zip(matrices, maps):
                if a is None:
                    continue
                out = a @ _pixel_rows(fmap) if out is None else out.addmm_(a, _pixel_rows(fmap))
        return out

    @staticmethod
    def backward(ctx, grad):
        grads, grad = [], grad.float().contiguous()           # once, not once per level
        with torch.autocast(grad.device.type, enabled=False):
            for a, (b, c, h, w), dtype in zip(ctx.matrices, ctx.shapes, ctx.dtypes):
                if a is None:
                    grads.append(None)
                    continue
                g = a.t() @ grad                                  # (B * H * W, C)
                grads.append(g.view(b, h, w, c).permute(0, 3, 1, 2).to(dtype))
        return (None, *grads)


def multilevel_roi_align(maps, rois, levels, scales, output_size: int = 7, sparse: bool = True) -> torch.Tensor:
    """(R, C, S, S) pooled features: RoI r from maps[levels[r]] at scales[levels[r]] (aligned, adaptive
    sampling). `rois` are (batch index, x1, y1, x2, y2); every map has the same channels. `sparse=False`
    keeps torchvision's kernels on the CPU too (the reference path of the benchmark)."""
    s = output_size
    if not sparse or maps[0].device.type != "cpu" or not len(rois):
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], s, s))
        for level, (fmap, scale) in enumerate(zip(maps, scales)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                out[idx] = roi_align(fmap, rois[idx].to(fmap.dtype), (s, s), spatial_scale=scale,
                                     sampling_ratio=0, aligned=True).to(out.dtype)
        return out
    matrices = []
    for level, (fmap, scale) in enumerate(zip(maps, scales)):
        own = levels == level          # the other levels' RoIs keep empty rows in this level's matrix
        b, _, h, w = fmap.shape
        matrices.append(interpolation_matrix(rois, scale, (b, h, w), s, select=own) if bool(own.any()) else None)
    flat = _SparsePool.apply(matrices, *maps)
    return flat.view(len(rois), s, s, -1).permute(0, 3, 1, 2).to(maps[0].dtype)
