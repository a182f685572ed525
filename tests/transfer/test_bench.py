"""The throughput benchmark runs both loops on the same batches and reports comparable figures."""
import pytest

from distill.core.errors import UserError
from transfer import bench


def test_bench_measures_our_loop_and_the_reference_loop(tmp_path):
    out = tmp_path / "bench.json"
    (r,) = bench.main(["--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8",
                       "--steps", "2", "--rounds", "1", "--warmup", "0", "--json", str(out)])
    assert r["ours_img_s"] > 0 and r["reference_img_s"] > 0
    assert r["ratio"] == pytest.approx(r["ours_img_s"] / r["reference_img_s"], rel=0.1)  # img/s are rounded
    assert r["param_groups"] > 1          # ours really uses the per-stage groups
    assert out.is_file() and "img/s" not in bench.markdown_row(r)
    with pytest.raises(UserError):
        bench.main(["--steps", "0"])
