"""The sparse-matrix RoIAlign against torchvision's kernels, forward and backward, RoI by RoI."""
import pytest
import torch
from torchvision.ops import roi_align

from detection.model import AlignedMultiScaleRoIAlign
from detection.roi_align import interpolation_matrix, multilevel_roi_align


def awkward_rois(n: int, size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """(batch index, x1, y1, x2, y2) in image pixels of a `size` px image: inside, across and beyond the
    borders, tiny, zero-size, inverted, tall and thin (large sample grids) and larger than the image."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)
    x1, y1 = u(n) * size * 1.2 - size * 0.1, u(n) * size * 1.2 - size * 0.1
    w, h = u(n) ** 2 * size, u(n) ** 2 * size
    w[: n // 8] = 0.0                                   # zero width
    h[n // 8: n // 4] = -u(n // 4 - n // 8) * 10        # inverted
    h[n // 4: n // 3] = size * 1.5                      # tall, thin, past both borders
    w[n // 4: n // 3] = 3.0
    rois = torch.stack([torch.randint(batch, (n,), generator=g).float(), x1, y1, x1 + w, y1 + h], 1)
    rois[-1] = torch.tensor([batch - 1, -2.0 * size, -2.0 * size, -size, -size])   # entirely outside
    return rois


@pytest.mark.parametrize("stride", [4, 8, 32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_level_matches_torchvision_forward_and_backward(stride, channels_last):
    size, batch = 96, 2
    fmap = torch.randn(batch, 5, size // stride, size // stride, generator=torch.Generator().manual_seed(stride))
    if channels_last:
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    rois = awkward_rois(64, size, batch)
    levels = torch.zeros(len(rois), dtype=torch.int64)
    grad = torch.randn(len(rois), 5, 7, 7, generator=torch.Generator().manual_seed(1))
    ref_map, our_map = fmap.clone().requires_grad_(), fmap.clone().requires_grad_()
    ref = roi_align(ref_map, rois, 7, spatial_scale=1 / stride, sampling_ratio=0, aligned=True)
    ours = multilevel_roi_align([our_map], rois, levels, [1 / stride])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ref.abs().sum() > 0 and (ours[-1] == 0).all()          # the RoI outside the image pools zeros
    ref.backward(grad)
    ours.backward(grad)
    torch.testing.assert_close(our_map.grad, ref_map.grad, rtol=1e-5, atol=1e-5)


def test_rows_sum_to_the_in_image_share_of_the_samples():
    # A RoI well inside the map: every cell's weights sum to 1 (an average of bilinear interpolations).
    a = interpolation_matrix(torch.tensor([[0.0, 8.0, 8.0, 40.0, 30.0]]), 0.5, (1, 32, 32), 7)
    torch.testing.assert_close(a.to_dense().sum(1), torch.ones(49))
    # Rows of RoIs left out by `select` are empty.
    b = interpolation_matrix(torch.tensor([[0.0, 8.0, 8.0, 40.0, 30.0]] * 2), 0.5, (1, 32, 32), 7,
                             select=torch.tensor([False, True]))
    assert b.to_dense()[:49].abs().sum() == 0 and b.to_dense()[49:].sum() == pytest.approx(49.0)


def reference_pool(maps, boxes, pool):
    """The pooler as it was: torchvision's roi_align per level, scattered into the output."""
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
    levels = pool.map_levels(boxes)
    out = maps[0].new_zeros((len(rois), maps[0].shape[1], 7, 7))
    for level, (fmap, scale) in enumerate(zip(maps, pool.scales)):
        idx = torch.where(levels == level)[0]
        out[idx] = roi_align(fmap, rois[idx], 7, spatial_scale=scale, sampling_ratio=0, aligned=True)
    return out


def test_multilevel_pool_matches_the_per_level_torchvision_path():
    size, names = 256, ("p2", "p3", "p4", "p5")
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 4, size // s, size // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = [awkward_rois(40, size, 1, seed=i)[:, 1:] for i in range(2)]
    pool = AlignedMultiScaleRoIAlign()
    assert len(set(pool.map_levels(boxes).tolist())) >= 3          # several levels really used
    ref_maps = [m.clone().requires_grad_() for m in maps]
    our_maps = [m.clone().requires_grad_() for m in maps]
    ref = reference_pool(ref_maps, boxes, pool)
    ours = pool(dict(zip(names, our_maps)), boxes)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn(ref.shape, generator=g)
    ref.backward(grad)
    ours.backward(grad)
    for mine, theirs in zip(our_maps, ref_maps):
        torch.testing.assert_close(mine.grad if mine.grad is not None else torch.zeros_like(theirs.grad),
                                   theirs.grad, rtol=1e-5, atol=1e-5)


def test_pool_keeps_16_bit_maps_and_handles_no_boxes():
    maps = [torch.randn(1, 3, 64 // s, 64 // s).bfloat16().requires_grad_() for s in (4, 8, 16, 32)]
    pool = AlignedMultiScaleRoIAlign()
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0], [0.0, 0.0, 64.0, 64.0]])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(dict(zip(("p2", "p3", "p4", "p5"), maps)), boxes)
    assert out.dtype == torch.bfloat16
    ref = reference_pool([m.float() for m in maps], boxes, pool)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert maps[0].grad.dtype == torch.bfloat16 and maps[0].grad.abs().sum() > 0
    assert pool(dict(zip(("p2", "p3", "p4", "p5"), maps)), [torch.zeros(0, 4)]).shape == (0, 3, 7, 7)
