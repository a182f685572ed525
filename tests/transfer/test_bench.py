"""The throughput benchmark: its figures are the images per second of what it timed, by a clock of our own,
and a loop made slower drags the ratio its way."""
import time

import pytest

from distill.core.errors import UserError
from transfer import bench

ARGS = ["--backbone", "timm:test_resnet", "--image-size", "32", "--batch-size", "8", "--steps", "2",
        "--warmup", "1", "--rounds", "3"]
N_IMAGES = 2 * 8    # what one timed round trains: steps x batch


def test_bench_reports_the_images_per_second_of_what_it_timed(tmp_path, monkeypatch):
    """Our clock around each timed round (outside the bench's, so never shorter): the bench reports
    images / seconds of that round, not steps/s, ms or a figure from elsewhere."""
    outside, real_measure = [], bench.measure

    def clocked(run_steps, n_images, device):
        t0 = time.perf_counter()
        ips = real_measure(run_steps, n_images, device)
        outside.append(time.perf_counter() - t0)
        return ips
    monkeypatch.setattr(bench, "measure", clocked)
    out = tmp_path / "bench.json"
    (r,) = bench.main([*ARGS, "--json", str(out)])
    reported = [ips for pair in zip(r["ours_all"], r["reference_all"]) for ips in pair]   # the order rounds run
    assert len(reported) == len(outside) == 2 * 3
    for ips, seconds in zip(reported, outside):
        assert 0.98 <= ips * seconds / N_IMAGES < 2, (ips, seconds)   # 0.98: img/s are rounded to 0.1
    assert r["param_groups"] > 1          # ours really uses the per-stage groups
    assert out.is_file() and "img/s" not in bench.markdown_row(r)
    with pytest.raises(UserError):
        bench.main(["--steps", "0"])


def test_a_slower_loop_loses_at_least_its_delay_and_swings_the_ratio(monkeypatch):
    """A sleep added to one loop's round, four times the slower round's time: that loop's round takes at
    least the sleep (a bound, not a timing), and ours/reference goes above 1 or below it."""
    (base,) = bench.main(ARGS)
    delay = max(0.1, 4 * N_IMAGES / min(base["ours_img_s"], base["reference_img_s"]))
    real_reference, real_engine = bench.reference_train_steps, bench.in_memory_engine

    monkeypatch.setattr(bench, "reference_train_steps", lambda *a: (time.sleep(delay), real_reference(*a)))
    (slow_reference,) = bench.main(ARGS)
    monkeypatch.setattr(bench, "reference_train_steps", real_reference)

    def slow_engine(*args, **kwargs):
        engine = real_engine(*args, **kwargs)
        train_epoch = engine.train_epoch
        engine.train_epoch = lambda *a, **k: (time.sleep(delay), train_epoch(*a, **k))[1]
        return engine
    monkeypatch.setattr(bench, "in_memory_engine", slow_engine)
    (slow_ours,) = bench.main(ARGS)

    assert N_IMAGES / slow_reference["reference_img_s"] >= 0.98 * delay
    assert N_IMAGES / slow_ours["ours_img_s"] >= 0.98 * delay
    assert slow_reference["ratio"] > 1 > slow_ours["ratio"], (base, slow_reference, slow_ours)
