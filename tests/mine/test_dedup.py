"""De-duplication (python -m distill.mine dedup): planted copies of val images are found, distinct images kept."""
import io
import os
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image, ImageOps

from distill.mine.dedup import ValIndex, main as dedup_main, top_candidates
from distill.core.errors import run_cli
from distill.mine.teacher import untrained_teacher
from distill.students.artifact import build_meta, read_meta, save_student
from helpers import make_artifact

KINDS = ("resized", "cropped", "flipped", "recompressed")


def plant_copy(src: Path, kind: str, n: int) -> Image.Image:
    """A near-duplicate as the web makes them: rescaled, cropped, mirrored or re-encoded at low quality."""
    im = Image.open(src).convert("RGB")
    w, h = im.size
    if kind == "resized":   # down and up, alternately
        size = (w * 3 // 4, h * 3 // 4) if n % 2 else (w * 3 // 2, h * 3 // 2)
        return im.resize(size, Image.BICUBIC)
    if kind == "cropped":
        return im.crop((w // 8, h // 8, w - w // 8, h - h // 8))
    if kind == "flipped":
        return ImageOps.mirror(im)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Pool = 12 planted copies of val images (3 of each kind) + 24 distinct demo images."""
    from distill.core.demo_data import generate

    root = tmp_path_factory.mktemp("dedup")
    generate(root / "data", num_classes=4, train_per_class=1, val_per_class=3, image_size=64, seed=3, unlabeled=24)
    val = sorted((root / "data" / "val").rglob("*.jpg"))
    pool = root / "pool"
    pool.mkdir()
    copies = {}
    for n, src in enumerate(val):
        kind = KINDS[n % 4]
        path = pool / f"copy_{n:02d}_{kind}.jpg"
        plant_copy(src, kind, n // 4).save(path, quality=90)
        copies[str(path)] = str(src)
    distinct = []
    for src in sorted((root / "data" / "unlabeled").glob("*.jpg")):
        path = pool / f"distinct_{src.name}"
        path.write_bytes(src.read_bytes())
        distinct.append(str(path))
    return root, copies, distinct


def test_every_planted_copy_is_removed_and_no_distinct_image(planted, tmp_path):
    root, copies, distinct = planted
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # A random-init teacher's features do not tell images apart, so let every pool x val pair reach the
        # SIFT check (cos -1, 12 candidates = all val images): the hardest case for false positives.
        run_cli(dedup_main, ["--teacher", "timm:test_resnet", "--num-classes", "4", "--input-size", "32",
                             "--pool", str(root / "pool"), "--against", str(root / "data" / "val"),
                             "-o", str(tmp_path / "kept.txt"), "--cos", "-1", "--candidates", "12",
                             "--workers", "0", "--device", "cpu", "--sift-size", "192",
                             "--allow-untrained-teacher"])
    finally:
        torch.set_num_threads(before)
    removed = [line.split("\t") for line in (tmp_path / "kept_removed.tsv").read_text().splitlines()[1:]]
    assert {r[0]: r[1] for r in removed} == {os.path.abspath(p): os.path.abspath(v) for p, v in copies.items()}
    assert all((r[6] == "1") == ("flipped" in r[0]) for r in removed)   # flips were matched mirrored
    assert all(r[3] == "sift" for r in removed if "cropped" in r[0])   # crops need the keypoint check
    kept = [os.path.abspath(tmp_path / line) for line in (tmp_path / "kept.txt").read_text().splitlines()]
    assert kept == [os.path.abspath(p) for p in distinct]
    sheet = Image.open(tmp_path / "kept_removed.png")
    assert sheet.width > 0 and sheet.height > 0


def test_candidates_in_chunks_equal_the_full_similarity_matrix():
    g = torch.Generator().manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=1)
    val = torch.nn.functional.normalize(torch.randn(2 * 50, 16, generator=g), dim=1)
    index = ValIndex([f"v{i}" for i in range(50)], val.half())
    full = pool @ val.half().float().T
    got = top_candidates(pool, index, max_candidates=3, threshold=0.1, chunk=7)
    for row, cands in zip(full, got):
        best = {}
        for j, s in enumerate(row.tolist()):          # an image and its mirror count once, the better one
            best[j // 2] = max(best.get(j // 2, -2), s)
        want = sorted(((s, v) for v, s in best.items() if s >= 0.1), key=lambda t: -t[0])[:3]
        assert [v for v, _ in cands] == [v for _, v in want]
        assert [s for _, s in cands] == pytest.approx([s for s, _ in want], abs=1e-6)


def test_a_teacher_without_trained_weights_is_refused(planted, tmp_path, capsys, ssld_home):
    root, _, _ = planted
    common = ["--pool", str(root / "pool"), "--against", str(root / "data" / "val"), "-o", str(tmp_path / "k.txt"),
              "--workers", "0", "--device", "cpu", "--input-size", "32"]
    untrained = tmp_path / "untrained.safetensors"
    save_student(untrained, timm.create_model("test_resnet", num_classes=4), build_meta("u", 4, arch="test_resnet"))
    for teacher, why in [("timm:test_resnet", "timm:test_resnet is randomly initialised"),
                         (str(untrained), f"{untrained} records no pretrain results")]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(dedup_main, ["--teacher", teacher, "--num-classes", "4", *common])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"error: dedup needs a trained teacher: {why}") and "--allow-untrained-teacher" in err
        assert not (tmp_path / "k.txt").exists()
    trained = make_artifact(tmp_path / "trained.safetensors", num_classes=4)   # records pretrain settings only
    assert untrained_teacher(str(trained), read_meta(trained)) is not None
    meta = dict(read_meta(trained))
    meta["pretrain"] = dict(meta["pretrain"], top1=71.5)
    assert untrained_teacher(str(trained), meta) is None
    assert untrained_teacher("timm:resnet50", dict(pretrain=dict(source="timm pretrained"))) is None
    # transfer.finetune keeps a random init's pretrain record and adds its score: trained (on the user's data)
    assert untrained_teacher("ft.safetensors", dict(pretrain=dict(source="random init"), transfer=dict(score=93.0))) is None
