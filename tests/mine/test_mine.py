"""Mining (python -m distill.mine): exact per-class top-k, exact 2-process merge, resume, merge, CLI errors."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.mine import mining as mine
from distill.data import list_source, wds_source
from distill.core.errors import run_cli
from distill.mine.topk import NO_ID, TopKPerClass

POOL_IMAGES, CLASSES, K, SHARD = 40, 4, 6, 8
TEACHER = ["--teacher", "timm:test_resnet", "--num-classes", str(CLASSES), "--input-size", "32"]


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread on a shared 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool_root(tmp_path_factory):
    """Demo shapes: 4 classes x 3 train images and 40 unlabeled pool images at 32 px."""
    from distill.core.demo_data import generate

    root = tmp_path_factory.mktemp("mine")
    generate(root / "data", num_classes=CLASSES, train_per_class=3, val_per_class=1, image_size=32, seed=1,
             unlabeled=POOL_IMAGES)
    return root


def mine_args(root, out, *extra):
    """fp32 (`--amp off`): the brute-force oracles score in fp32; bf16 mining has its own test."""
    return [*TEACHER, "--pool", str(root / "data" / "unlabeled_list.txt"), "--k", str(K), "-o", str(out),
            "--shard-size", str(SHARD), "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--no-progress", "--amp", "off", *extra]


def read_lines(path):
    return Path(path).read_text().splitlines()


def brute_force(scores: list[list[float]], k: int, top1_only=False):
    """Per class: sort every (score, id) by score descending then id ascending, keep k."""
    out = []
    for c in range(len(scores[0])):
        rows = [(s[c], i) for i, s in enumerate(scores)
                if not top1_only or max(range(len(s)), key=lambda j: (s[j], -j)) == c]
        out.append(sorted(rows, key=lambda r: (-r[0], r[1]))[:k])
    return out


def as_lists(topk: TopKPerClass):
    return [[(s, i) for s, i in zip(topk.scores[c].tolist(), topk.ids[c].tolist()) if i != NO_ID]
            for c in range(topk.scores.shape[0])]


@pytest.mark.parametrize("top1_only", [False, True])
def test_top_k_per_class_matches_brute_force_with_ties_in_any_batching(top1_only):
    rng = random.Random(0)
    n, c, k = 300, 7, 9
    # quantised scores: many exact ties, which must resolve by pool order (smaller id first)
    scores = [[rng.randint(0, 12) / 12 for _ in range(c)] for _ in range(n)]
    expected = brute_force(scores, k, top1_only)
    probs = torch.tensor(scores, dtype=torch.float32)
    ids = torch.arange(n)
    for trial in range(3):
        order = list(range(n))
        rng.shuffle(order)                 # batches in any order and of any size
        topk = TopKPerClass(c, k)
        pos = 0
        while pos < n:
            step = rng.randint(1, 40)
            chunk = torch.tensor(order[pos:pos + step])
            topk.add_batch(probs[chunk], ids[chunk], top1_only=top1_only)
            pos += step
        assert as_lists(topk) == [[(float(torch.tensor(s)), i) for s, i in cls] for cls in expected]
    # merging partial top-k of a partition (ranks, shards) equals the whole
    parts = [TopKPerClass(c, k) for _ in range(3)]
    for j, part in enumerate(parts):
        part.add_batch(probs[j::3], ids[j::3], top1_only=top1_only)
    merged = TopKPerClass(c, k)
    for part in reversed(parts):
        merged.absorb(part.scores, part.ids)
    assert as_lists(merged) == as_lists(topk)


def test_memory_is_classes_times_k_not_pool():
    topk = TopKPerClass(10, 3)
    for start in range(0, 10_000, 500):
        topk.add_batch(torch.rand(500, 10), torch.arange(start, start + 500))
    assert topk.scores.shape == topk.ids.shape == (10, 3)


def test_mined_list_is_the_brute_force_top_k_of_the_teacher(pool_root, tmp_path, one_thread):
    out = tmp_path / "mined.txt"
    run_cli(mine.main, mine_args(pool_root, out))
    # reference: the same teacher and preprocessing, every pool image scored, sorted per class
    pool = mine.open_pool(pool_root / "data" / "unlabeled_list.txt", SHARD)
    teacher, transform, _, _ = mine.load_mining_teacher(["timm:test_resnet"], CLASSES, 32)
    scores = []
    for batch in mine.shard_loader(pool, range(pool.num_shards), transform, 4, 0):
        if len(batch["ids"]):     # a shard's final batch may be empty: it only marks the shard done
            scores += teacher(batch["images"]).tolist()
    assert len(scores) == POOL_IMAGES
    expected = [f"{os.path.relpath(pool.samples[i][0], tmp_path)} {c}"
                for c, rows in enumerate(brute_force(scores, K)) for _, i in rows]
    lines = read_lines(out)
    assert [" ".join(line.split()[:2]) for line in lines] == expected
    assert len(lines) == CLASSES * K
    got = [float(line.split()[2]) for line in lines]
    want = [s for rows in brute_force(scores, K) for s, _ in rows]
    assert got == pytest.approx(want, rel=1e-5)
    summary = json.loads((tmp_path / "mined_summary.json").read_text())
    assert [r["count"] for r in summary["per_class"]] == [K] * CLASSES
    assert summary["pool_images_scored"] == POOL_IMAGES and summary["computed_shards"] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "mined_state").exists()   # the resume state goes once the list is written
    # top1: every image at most once, under its argmax class
    run_cli(mine.main, mine_args(pool_root, tmp_path / "top1.txt", "--assign", "top1"))
    top1 = read_lines(tmp_path / "top1.txt")
    assert len({line.split()[0] for line in top1}) == len(top1)
    for line in top1:
        path, c, _ = line.split()
        row = scores[next(i for i, (p, _) in enumerate(pool.samples) if os.path.relpath(p, tmp_path) == path)]
        assert max(range(CLASSES), key=lambda j: row[j]) == int(c)


def test_two_processes_give_the_same_list_as_one(pool_root, tmp_path, one_thread):
    run_cli(mine.main, mine_args(pool_root, tmp_path / "one.txt"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29500 + os.getpid() % 1000), "-m", "distill.mine",
                          *mine_args(pool_root, tmp_path / "two.txt")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    assert read_lines(tmp_path / "two.txt") == read_lines(tmp_path / "one.txt")
    summary = json.loads((tmp_path / "two_summary.json").read_text())
    assert summary["processes"] == 2 and summary["computed_shards"] == [0, 1, 2, 3, 4]


def test_resume_after_interruption_skips_finished_shards(pool_root, tmp_path, monkeypatch, one_thread):
    run_cli(mine.main, mine_args(pool_root, tmp_path / "whole.txt"))
    saves = []
    real_save = mine.save_state

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(list(state["done"]))
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after the second shard's state reached the disk

    monkeypatch.setattr(mine, "save_state", save_then_die)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(mine.main, mine_args(pool_root, tmp_path / "mined.txt"))
    assert exit_info.value.code == 130 and saves[-1] == [0, 1]
    assert not (tmp_path / "mined.txt").exists() and (tmp_path / "mined_state").is_dir()
    monkeypatch.setattr(mine, "save_state", real_save)
    computed = []
    real_items = mine.Pool.items

    def counting_items(self, shard, *args, **kwargs):
        computed.append(shard)
        return real_items(self, shard, *args, **kwargs)

    monkeypatch.setattr(mine.Pool, "items", counting_items)
    run_cli(mine.main, mine_args(pool_root, tmp_path / "mined.txt"))
    assert computed == [2, 3, 4]     # shards 0 and 1 were not read again
    summary = json.loads((tmp_path / "mined_summary.json").read_text())
    assert summary["shards_resumed"] == 2 and summary["computed_shards"] == [2, 3, 4]
    assert summary["pool_images_scored"] == POOL_IMAGES
    assert read_lines(tmp_path / "mined.txt") == read_lines(tmp_path / "whole.txt")


def test_resume_refuses_other_settings(pool_root, tmp_path, monkeypatch, one_thread, capsys):
    def die(path, state):
        mine.save_checkpoint(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(mine, "save_state", die)
    with pytest.raises(SystemExit):
        run_cli(mine.main, mine_args(pool_root, tmp_path / "mined.txt"))
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(mine.main, mine_args(pool_root, tmp_path / "mined.txt", "--assign", "top1"))
    assert exit_info.value.code == 2
    assert "other settings (assign: 'all' -> 'top1')" in capsys.readouterr().err


def test_merged_list_and_wds_pool_feed_the_trainer(pool_root, tmp_path, one_thread):
    data = pool_root / "data"
    out = tmp_path / "lists" / "mined.txt"
    run_cli(mine.main, mine_args(pool_root, out, "--merge-with", str(data / "train_list.txt")))
    merged = list_source(tmp_path / "lists" / "mined_merged.txt")   # the trainer's reader
    train = list_source(data / "train_list.txt")
    assert len(merged.samples) == len(train.samples) + CLASSES * K
    assert [os.path.abspath(p) for p, _ in merged.samples[:len(train.samples)]] == \
        [os.path.abspath(p) for p, _ in train.samples]
    mined = [(line.split()[0], int(line.split()[1])) for line in read_lines(out)]
    assert [(os.path.abspath(p), c) for p, c in merged.samples[len(train.samples):]] == \
        [(os.path.abspath(out.parent / p), c) for p, c in mined]
    # the same images as WebDataset shards: the same selection; --write-shards gives the trainer labeled shards
    import webdataset as wds
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "pool-%02d.tar"), maxcount=SHARD, verbose=0) as sink:
        for p, _ in list_source(data / "unlabeled_list.txt").samples:
            sink.write({"__key__": Path(p).stem, "jpg": Path(p).read_bytes()})
    args = mine_args(pool_root, tmp_path / "wds_mined.txt", "--write-shards", str(tmp_path / "mined_shards"))
    args[args.index("--pool") + 1] = str(tmp_path / "wds" / "pool-{00..04}.tar")
    run_cli(mine.main, args)
    by_wds = [(line.split()[0].split("#")[1], line.split()[1], line.split()[2]) for line in
              read_lines(tmp_path / "wds_mined.txt")]
    assert by_wds == [(Path(p).stem, c, s) for p, c, s in (line.split() for line in read_lines(out))]
    shards = wds_source(str(tmp_path / "mined_shards" / "*.tar"))
    assert shards.size == CLASSES * K


def test_cli_errors_are_one_line(pool_root, tmp_path, capsys, ssld_home):
    cases = [
        (["--pool", str(tmp_path / "missing"), "--teacher", "timm:test_resnet"], "pool not found"),
        (["--pool", str(pool_root / "data" / "unlabeled_list.txt"), "--teacher", "no_such_teacher"],
         "no student artifact 'no_such_teacher'"),
        (["--pool", str(pool_root / "data" / "unlabeled"), "--teacher", "timm:not_a_model"], "unknown timm model"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(mine.main, [*args, "--k", "2", "-o", str(tmp_path / "m.txt"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_demo_mined_recipe_trains_on_the_merged_list():
    from distill import ssld
    from distill.core.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_mined.yaml", [], ssld.DEFAULTS)
    ssld.check(cfg)
    assert [dict(s) for s in cfg.data.train] == [{"type": "list", "path": "mined/ssld_train_list.txt"}]
    assert cfg.loss.kind == "ssld" and cfg.loss.hard_weight == 0 and cfg.teacher.models


@pytest.mark.parametrize("flag, value, allowed", [("--input-size", "-3", "an integer >= 8"),
                                                  ("--workers", "-1", "an integer >= 0"),
                                                  ("--batch-size", "0", "an integer >= 1"),
                                                  ("--k", "-2", "an integer >= 1"),
                                                  ("--shard-size", "x", "an integer >= 1"),
                                                  ("--num-classes", "0", "an integer >= 1")])
def test_out_of_range_flags_are_refused_at_parse_time_naming_the_flag(tmp_path, capsys, flag, value, allowed):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(mine.main, ["--pool", str(tmp_path / "missing"), "--teacher", "timm:test_resnet", "--k", "2",
                            "-o", str(tmp_path / "m.txt"), flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: argument {flag}: expected {allowed}, got ")   # before the pool is looked at


def test_state_folder_goes_even_after_a_kill_mid_save(pool_root, tmp_path, one_thread):
    """A kill -9 during the last state save leaves a temporary in OUT_state/; the next run removes it."""
    import subprocess
    import sys
    out = tmp_path / "mined.txt"
    run_cli(mine.main, mine_args(pool_root, tmp_path / "first.txt"))
    state = tmp_path / "mined_state"
    state.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from distill.core.atomic import _HOST
    (state / f".rank000-of-001.pt.{_HOST}-{dead.pid}.abc123.tmp").write_bytes(b"half a checkpoint")
    run_cli(mine.main, mine_args(pool_root, out))
    assert not state.exists()
    assert read_lines(out) == read_lines(tmp_path / "first.txt")


def test_teacher_pass_bench_times_both_loops_on_the_same_images_with_the_same_outputs(tmp_path):
    from distill.mine.bench import format_teacher_pass, teacher_pass_bench, write_bench_pool

    write_bench_pool(tmp_path, 1000, 16)
    files = sorted((tmp_path / "files").glob("*.jpg"))[:12]
    r = teacher_pass_bench("timm:test_resnet", 10, files, input_size=32, batch_size=8, device="cpu", rounds=2,
                           amp="off")
    assert r["images"] == 12 and len(r["img_per_s"]) == 2 and all(v > 0 for v in r["img_per_s"].values())
    assert r["max_prob_diff"] < 1e-5                    # inference mode + channels_last change no number
    assert "channels_last" in format_teacher_pass(r) and "no_grad" in format_teacher_pass(r)
    half = teacher_pass_bench("timm:test_resnet", 10, files, input_size=32, batch_size=8, device="cpu", rounds=1,
                              amp="bf16")
    assert 1e-7 < half["max_prob_diff"] < 1e-2 and "amp bf16" in format_teacher_pass(half)   # bf16 rounding only


def test_auto_amp_is_bf16_where_native_and_bf16_mining_is_the_fp32_top_k_up_to_rounding(pool_root, tmp_path):
    from distill.core.precision import native_bf16
    from distill.mine.teacher import teacher_amp

    assert teacher_amp("auto", "cuda") == "bf16" and teacher_amp("off", "cuda") == "off"
    assert teacher_amp("auto", "cpu") == ("bf16" if native_bf16("cpu") else "off")
    run_cli(mine.main, mine_args(pool_root, tmp_path / "fp32.txt"))
    run_cli(mine.main, mine_args(pool_root, tmp_path / "bf16.txt", "--amp", "bf16"))
    fp32 = {tuple(line.split()[:2]): float(line.split()[2]) for line in read_lines(tmp_path / "fp32.txt")}
    bf16 = [(tuple(line.split()[:2]), float(line.split()[2])) for line in read_lines(tmp_path / "bf16.txt")]
    kth = {c: min(v for (_, cc), v in fp32.items() if cc == c) for _, c in fp32}
    assert len(bf16) == len(fp32)
    for (image, c), score in bf16:          # any swap is between scores within bf16 rounding of the k-th
        assert fp32.get((image, c), score) == pytest.approx(score, abs=1e-2)
        assert (image, c) in fp32 or score >= kth[c] - 1e-2
