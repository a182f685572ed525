"""Every CLI over a catalogue of bad files and values: exit code 2 and one `error: ...` line, never a
traceback (or, for an unreadable image among good ones, a skip that is counted and the run finishes).

The rows run as `python -m MODULE ARGS` in processes forked from one interpreter that has already imported
torch (a "zygote"): the module runs as __main__ exactly as from a shell, but a row costs its own work, not
another second of imports. `test_zygote_matches_a_real_subprocess` checks the two agree.

Trainer rows (distill.ssld, transfer.finetune, detection.train) use the run/-o/--out-dir vocabulary;
a trainer's rows run once its name is in TRAINERS_READY, and are reported as skipped until then.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
# Trainers whose rows are enabled. The lead adds a name here when its engine port lands.
TRAINERS_READY: set[str] = {"distill.ssld", "transfer.finetune", "detection.train"}
# Rows that need a change in a file this catalogue's owner does not own: skipped, with the change named.
OWNER_FIX: dict = {}  # rows whose fix is pending in another file (none now): id -> the fix
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
ROW_TIMEOUT_S = 60
UNWRITABLE = "/sys/ssld-kit-bad-inputs"   # refuses even root (chmod does not, and CI runs as root)


@dataclass
class Row:
    id: str
    module: str
    args: list
    expect: str                      # a substring of the error line (or of stderr for a skip)
    kind: str = "error"              # error | skip (finishes, exit 0, says what it skipped) | ok
    env: dict = field(default_factory=dict)

    @property
    def trainer(self) -> bool:
        return self.module in ("distill.ssld", "transfer.finetune", "detection.train")


ZYGOTE = textwrap.dedent('''
    import io, json, os, runpy, signal, sys, time, traceback
    import numpy, PIL.Image, torch, torchvision, timm, yaml, safetensors  # the slow imports, once
    torch.set_num_threads(1)
    rows, results_path, timeout = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3])
    results = {}
    for row in rows:
        out, err = row["dir"] + "/stdout", row["dir"] + "/stderr"
        os.makedirs(row["dir"], exist_ok=True)
        start = time.time()
        pid = os.fork()
        if pid == 0:
            os.chdir(row["dir"])
            os.environ.update(row["env"])
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.argv = ["-m", *row["args"]]
            code = 0
            try:
                runpy.run_module(row["module"], run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.time() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = "timeout"
                break
            time.sleep(0.02)
        results[row["id"]] = dict(code=code, seconds=round(time.time() - start, 2),
                                  stdout=open(out).read(), stderr=open(err).read())
    json.dump(results, open(results_path, "w"))
''')


class Evil:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bomb_png(path: Path) -> Path:
    """A 20000 x 20000 PNG in 100 bytes: its header alone trips PIL's decompression-bomb check."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    return path


def _coco(demo_root, name="instances_val.json"):
    return json.loads((demo_root / "annotations" / name).read_text())


def detection_checkpoint(path, demo_root):
    """A real (untrained) detection checkpoint, in the format detection.train writes, so that eval and
    predict rows fail on the bad input they are given and not on the checkpoint."""
    from detection.config import DEFAULTS
    from detection.model import build_detector
    from distill.core.checkpoint import save_checkpoint
    from distill.students.artifact import load_student
    torch.manual_seed(0)
    trunk, meta = load_student("timm:test_resnet")
    cfg = copy.deepcopy(DEFAULTS["model"])
    cfg.update(arch="faster", backbone="timm:test_resnet", fpn_channels=8, box_head_dim=16, train_sizes=[64],
               test_size=64, max_size=64, rpn_post_nms_train=20, roi_batch_per_image=16)
    model = build_detector(cfg, 4, trunk, meta)
    coco = _coco(demo_root)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    data = dict(DEFAULTS.get("data", {}), val_json=str(demo_root / "annotations" / "instances_val.json"),
                val_images=str(demo_root))
    save_checkpoint(path, dict(model=model.state_dict(), model_config=cfg, backbone_meta=meta,
                               classes=[c["name"] for c in cats], category_ids=[c["id"] for c in cats],
                               config=dict(data=data)))
    return path


def build_catalogue(root: Path, demo_root: Path) -> list[Row]:
    """The bad files, then the rows that feed them to the CLIs."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "PWNED"
    f = {}
    f["bad_yaml"] = root / "bad.yaml"
    f["bad_yaml"].write_text("run: {out_dir: x\ndata: [1, 2\n  - : :\n")
    f["tab_yaml"] = root / "tab.yaml"
    f["tab_yaml"].write_text("run:\n\tout_dir: x\n")
    f["hostile_pt"] = root / "hostile.pt"
    torch.save({"model": Evil(marker), "meta": {}}, f["hostile_pt"])
    f["hostile_pdparams"] = root / "hostile.pdparams"
    f["hostile_pdparams"].write_bytes(pickle.dumps({"conv1_weights": Evil(marker)}))
    good_pt = root / "good.pt"
    torch.save({"model": {"w": torch.zeros(64, 64)}, "meta": {"arch": "test_resnet"}}, good_pt)
    f["truncated_pt"] = root / "truncated.pt"
    f["truncated_pt"].write_bytes(good_pt.read_bytes()[: good_pt.stat().st_size // 2])
    f["foreign_pt"] = root / "foreign.pt"
    torch.save(torch.arange(10), f["foreign_pt"])                     # a valid torch file, not a checkpoint
    f["empty_pt"] = root / "empty.pt"
    f["empty_pt"].write_bytes(b"")
    f["garbage_safetensors"] = root / "garbage.safetensors"
    f["garbage_safetensors"].write_bytes(os.urandom(256))
    f["truncated_pdparams"] = root / "truncated.pdparams"
    f["truncated_pdparams"].write_bytes(pickle.dumps({"conv1_weights": list(range(100))})[:40])
    f["garbage_pdparams"] = root / "garbage.pdparams"
    f["garbage_pdparams"].write_bytes(os.urandom(300))
    f["corrupt_jpg"] = root / "corrupt.jpg"
    f["corrupt_jpg"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    pool = root / "pool"                                     # good images, one corrupt, one decompression bomb
    pool.mkdir()
    for p in sorted((demo_root / "train").rglob("*.jpg"))[:6]:
        (pool / p.name).write_bytes(p.read_bytes())
    (pool / "zz_corrupt.jpg").write_bytes(f["corrupt_jpg"].read_bytes())
    f["bomb"] = bomb_png(pool / "zz_bomb.png")
    f["pool"] = pool
    f["empty_dir"] = root / "empty"
    f["empty_dir"].mkdir()
    folder = root / "folder_with_empty_class"                        # an ImageFolder with an empty class
    for split in ("train", "val"):
        for p in sorted((demo_root / split).iterdir()):
            (folder / split / p.name).mkdir(parents=True)
            for img in sorted(p.iterdir())[:3]:
                (folder / split / p.name / img.name).write_bytes(img.read_bytes())
    (folder / "train" / "aaa_empty").mkdir()
    f["folder_empty_class"] = folder

    coco = _coco(demo_root)
    def coco_file(name, change):
        data = copy.deepcopy(coco)
        change(data)
        path = root / name
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        return path
    f["coco_not_json"] = root / "not_json.json"
    f["coco_not_json"].write_text('{"images": [1, 2,')
    f["coco_no_lists"] = coco_file("no_lists.json", lambda d: d.pop("annotations"))
    f["coco_bad_bbox"] = coco_file("bad_bbox.json", lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, "x", 4]))
    f["coco_neg_box"] = coco_file("neg_box.json", lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, -5, 4]))
    f["coco_all_crowd"] = coco_file("all_crowd.json", lambda d: [a.__setitem__("iscrowd", 1) for a in d["annotations"]])
    f["coco_unknown_cat"] = coco_file("unknown_cat.json",
                                      lambda d: d["annotations"][0].__setitem__("category_id", 77))
    f["coco_dup_image"] = coco_file("dup_image.json", lambda d: d["images"].append(dict(d["images"][0])))
    f["coco_missing_file"] = coco_file("missing_file.json",
                                       lambda d: d["images"][0].__setitem__("file_name", "val/nope.jpg"))
    f["coco_other_cats"] = coco_file("other_cats.json", lambda d: d["categories"].append(dict(id=99, name="extra")))
    f["coco_bomb"] = coco_file("bomb.json", lambda d: d["images"][0].__setitem__("file_name", str(f["bomb"])))
    f["detector"] = detection_checkpoint(root / "detector.pt", demo_root)

    teacher = ["--teacher", "timm:test_resnet", "--num-classes", "4", "--input-size", "32", "--device", "cpu",
               "--workers", "0", "--no-progress"]
    mine = lambda *a, t=teacher: ["--pool", str(pool), "--k", "2", "-o", str(root / "mined" / "m.txt"), *t, *a]
    with_teacher = lambda src: ["--teacher", str(src), *teacher[2:]]
    dedup_args = lambda *a: ["dedup", "--pool", str(pool), "--against", str(demo_root / "val"),
                             "-o", str(root / "dedup" / "kept.txt"), *teacher[:-1], *a]
    ckpt = ["--checkpoint", str(f["detector"]), "--device", "cpu", "--workers", "0"]
    val = lambda p: [*ckpt, "--val-json", str(p), "--val-images", str(demo_root)]
    rows = [
        # distill.mine
        Row("mine-missing-pool", "distill.mine", ["--pool", str(root / "nope"), "--k", "2", "-o", "m.txt", *teacher],
            "pool not found"),
        Row("mine-empty-pool", "distill.mine", ["--pool", str(f["empty_dir"]), "--k", "2", "-o", "m.txt", *teacher],
            str(f["empty_dir"])),
        Row("mine-input-size-negative", "distill.mine", mine("--input-size", "-3"), "argument --input-size"),
        Row("mine-workers-negative", "distill.mine", mine("--workers", "-1"), "argument --workers"),
        Row("mine-k-zero", "distill.mine", mine("--k", "0"), "argument --k"),
        Row("mine-batch-size-text", "distill.mine", mine("--batch-size", "many"), "argument --batch-size"),
        Row("mine-unknown-flag", "distill.mine", mine("--topk", "3"), "unrecognized arguments: --topk"),
        Row("mine-hostile-teacher", "distill.mine", mine(t=with_teacher(f["hostile_pt"])), str(f["hostile_pt"])),
        Row("mine-truncated-teacher", "distill.mine", mine(t=with_teacher(f["truncated_pt"])), str(f["truncated_pt"])),
        Row("mine-foreign-teacher", "distill.mine", mine(t=with_teacher(f["foreign_pt"])), str(f["foreign_pt"])),
        Row("mine-empty-teacher", "distill.mine", mine(t=with_teacher(f["empty_pt"])), str(f["empty_pt"])),
        Row("mine-garbage-artifact", "distill.mine", mine(t=with_teacher(f["garbage_safetensors"])),
            str(f["garbage_safetensors"])),
        Row("mine-unknown-teacher", "distill.mine", mine(t=with_teacher("timm:no_such_net")), "no_such_net"),
        Row("mine-missing-class-names", "distill.mine", mine("--class-names", str(root / "nope.txt")),
            "--class-names"),
        Row("mine-missing-exclude", "distill.mine", mine("--exclude", str(root / "nope.tsv")), "--exclude"),
        Row("mine-unwritable-out", "distill.mine",
            ["--pool", str(pool), "--k", "2", "-o", f"{UNWRITABLE}/m.txt", *teacher], f"cannot write {UNWRITABLE}"),
        Row("mine-corrupt-and-bomb-skipped", "distill.mine", mine(), "2 unreadable skipped", kind="skip"),
        # distill.mine dedup
        Row("dedup-untrained-teacher", "distill.mine", dedup_args(), "needs a trained teacher"),
        Row("dedup-cos-out-of-range", "distill.mine", dedup_args("--cos", "2"), "argument --cos"),
        Row("dedup-ratio-zero", "distill.mine", dedup_args("--ratio", "0"), "argument --ratio"),
        Row("dedup-missing-against", "distill.mine",
            ["dedup", "--pool", str(pool), "--against", str(root / "nope"), "-o", "k.txt", *teacher[:-1]],
            "--against"),
        # distill.convert
        Row("convert-hostile-pdparams", "distill.convert", [str(f["hostile_pdparams"]), "--arch", "r18_vd",
                                                            "-o", str(root / "c.safetensors")], "hostile.pdparams"),
        Row("convert-truncated-pdparams", "distill.convert", [str(f["truncated_pdparams"]), "--arch", "r18_vd",
                                                              "-o", str(root / "c.safetensors")], "truncated.pdparams"),
        Row("convert-garbage-pdparams", "distill.convert", [str(f["garbage_pdparams"]), "--arch", "r18_vd",
                                                            "-o", str(root / "c.safetensors")], "garbage.pdparams"),
        Row("convert-missing-file", "distill.convert", [str(root / "nope.pdparams"), "--arch", "r18_vd"],
            "nope.pdparams"),
        Row("convert-unknown-arch", "distill.convert", [str(f["garbage_pdparams"]), "--arch", "r999_vd"], "r999_vd"),
        Row("convert-download-offline", "distill.convert", ["--download", "ResNet50_vd_ssld"], "ResNet50_vd_ssld",
            env=NO_NETWORK),
        # distill.zoo
        Row("zoo-unknown-flag", "distill.zoo", ["--bogus"], "--bogus"),
        # distill.demo_data
        Row("demo-data-negative-count", "distill.demo_data", [str(root / "d1"), "--train-per-class", "-1"],
            "train_per_class"),
        Row("demo-data-negative-size", "distill.demo_data", [str(root / "d2"), "--image-size", "-5"], "image_size"),
        Row("demo-data-too-many-classes", "distill.demo_data", [str(root / "d3"), "--classes", "99"], "classes"),
        Row("demo-data-clutter-range", "distill.demo_data", [str(root / "d4"), "--clutter", "3"], "clutter"),
        Row("demo-data-unwritable", "distill.demo_data", [f"{UNWRITABLE}/demo", "--train-per-class", "1",
                                                          "--val-per-class", "1", "--image-size", "32"],
            f"cannot write {UNWRITABLE}"),
        # detection.eval
        Row("eval-batch-size-negative", "detection.eval", [*ckpt, "--batch-size", "-1"], "argument --batch-size"),
        Row("eval-good-inputs-control", "detection.eval", val(demo_root / "annotations" / "instances_val.json"),
            "AP50", kind="ok"),
        Row("eval-missing-checkpoint", "detection.eval", ["--checkpoint", str(root / "nope.pt")], "nope.pt"),
        Row("eval-hostile-checkpoint", "detection.eval", ["--checkpoint", str(f["hostile_pt"])], "hostile.pt"),
        Row("eval-truncated-checkpoint", "detection.eval", ["--checkpoint", str(f["truncated_pt"])], "truncated.pt"),
        Row("eval-foreign-checkpoint", "detection.eval", ["--checkpoint", str(f["foreign_pt"])], "foreign.pt"),
        Row("eval-classifier-checkpoint", "detection.eval", ["--checkpoint", str(good_pt)],
            "is not a detection checkpoint"),
        Row("eval-coco-not-json", "detection.eval", val(f["coco_not_json"]), "is not valid JSON"),
        Row("eval-coco-no-lists", "detection.eval", val(f["coco_no_lists"]), "is not a COCO detection file"),
        Row("eval-coco-bad-bbox", "detection.eval", val(f["coco_bad_bbox"]), "bbox"),
        Row("eval-coco-negative-box", "detection.eval", val(f["coco_neg_box"]), "negative width or height"),
        Row("eval-coco-all-crowd", "detection.eval", val(f["coco_all_crowd"]), "no usable box"),
        Row("eval-coco-unknown-category", "detection.eval", val(f["coco_unknown_cat"]), "category_id 77"),
        Row("eval-coco-duplicate-image", "detection.eval", val(f["coco_dup_image"]), "unique integer 'id'"),
        Row("eval-coco-missing-image-file", "detection.eval", val(f["coco_missing_file"]), "val/nope.jpg"),
        Row("eval-coco-other-categories", "detection.eval", val(f["coco_other_cats"]), "differ from the training set"),
        Row("eval-unwritable-results", "detection.eval",
            [*val(demo_root / "annotations" / "instances_val.json"), "--results", f"{UNWRITABLE}/results.json"],
            f"cannot write {UNWRITABLE}/results.json"),
        Row("eval-bomb-image-skipped", "detection.eval", val(f["coco_bomb"]), "1 corrupt, skipped", kind="skip"),
        Row("predict-bomb-image", "detection.predict",
            ["--checkpoint", str(f["detector"]), str(f["bomb"]), "--device", "cpu", "--out-dir", str(root / "pred2")],
            "zz_bomb.png"),
        Row("eval-coco-missing-json", "detection.eval", val(root / "nope.json"), "annotation file not found"),
        # detection.predict
        Row("predict-missing-checkpoint", "detection.predict",
            ["--checkpoint", str(root / "nope.pt"), str(f["corrupt_jpg"])], "nope.pt"),
        Row("predict-hostile-checkpoint", "detection.predict",
            ["--checkpoint", str(f["hostile_pt"]), str(f["corrupt_jpg"])], "hostile.pt"),
        Row("predict-missing-image", "detection.predict",
            ["--checkpoint", str(f["detector"]), str(root / "nope.jpg"), "--device", "cpu"], "nope.jpg"),
        Row("predict-corrupt-image", "detection.predict",
            ["--checkpoint", str(f["detector"]), str(f["corrupt_jpg"]), "--device", "cpu",
             "--out-dir", str(root / "pred")], "corrupt.jpg"),
        Row("predict-score-thresh-range", "detection.predict",
            ["--checkpoint", str(f["detector"]), str(f["corrupt_jpg"]), "--score-thresh", "7"], "--score-thresh"),
        # distill.demo
        Row("demo-unwritable", "distill.demo", [f"{UNWRITABLE}/demo"], f"cannot write {UNWRITABLE}"),
        Row("demo-bad-until", "distill.demo", [str(root / "demo_run"), "--until", "nowhere"], "--until"),
        # transfer.search (fails before any cell trains)
        Row("search-all-without-datasets", "transfer.search",
            ["--all", "--data-root", str(f["empty_dir"]), "--baseline", "timm:test_resnet", "--distilled",
             "timm:test_resnet", "--out-dir", str(root / "search1"), "--device", "cpu"], "nothing ran"),
        Row("search-grid-malformed", "transfer.search",
            ["--dataset", f"folder:{demo_root}", "--backbone", "timm:test_resnet", "--grid", "lr",
             "--out-dir", str(root / "search2"), "--device", "cpu"], "grid axis 'lr'"),
        Row("search-gpus-negative", "transfer.search",
            ["--dataset", f"folder:{demo_root}", "--backbone", "timm:test_resnet", "--gpus", "-1",
             "--out-dir", str(root / "search3"), "--device", "cpu"], "--gpus"),
        # transfer.datasets
        Row("datasets-unknown-name", "transfer.datasets", ["flowers", "--data-root", str(root)], "flowers"),
        Row("datasets-missing", "transfer.datasets", ["dtd", "--data-root", str(root)], "dtd"),
        Row("datasets-download-offline", "transfer.datasets",
            ["cifar10", "--download", "--data-root", str(root / "dl")], "cifar10", env=NO_NETWORK),
        Row("datasets-missing-folder", "transfer.datasets", [f"folder:{root / 'nope'}"], "nope"),
        Row("datasets-folder-empty-class", "transfer.datasets", [f"folder:{folder}"], "aaa_empty"),
    ]
    rows += trainer_rows(root, demo_root, f)
    return rows, marker


def trainer_rows(root: Path, demo_root: Path, f: dict) -> list[Row]:
    """The three trainers in the run/-o/--out-dir vocabulary; enabled through TRAINERS_READY."""
    cfg = write_config(root, tiny_config(root, demo_root, name="ssld"), name="ssld.yaml")
    ssld = lambda *a: ["-c", cfg, *a]
    teacher_cfg = write_config(root, tiny_config(root, demo_root, name="ssld_t", loss=dict(kind="ssld"),
                                                 teacher=dict(models=[str(f["hostile_pt"])])), name="ssld_t.yaml")
    ft = lambda *a: ["--dataset", f"folder:{demo_root}", "--backbone", "timm:test_resnet", "--device", "cpu",
                     "--out-dir", str(root / "ft"), *a]
    det_cfg = str(REPO / "configs" / "detection" / "demo.yaml")
    det = lambda *a: ["-c", det_cfg, "-o", f"data.train_json={demo_root / 'annotations' / 'instances_train.json'}",
                      "-o", f"data.train_images={demo_root}", "-o",
                      f"data.val_json={demo_root / 'annotations' / 'instances_val.json'}",
                      "-o", f"data.val_images={demo_root}", "-o", "model.backbone=timm:test_resnet",
                      "-o", "run.device=cpu", "--out-dir", str(root / "det"), *a]
    return [
        Row("ssld-malformed-yaml", "distill.ssld", ["-c", str(f["bad_yaml"])], "bad.yaml"),
        Row("ssld-tab-yaml", "distill.ssld", ["-c", str(f["tab_yaml"])], "tab.yaml"),
        Row("ssld-missing-config", "distill.ssld", ["-c", str(root / "nope.yaml")], "nope.yaml"),
        Row("ssld-unknown-key", "distill.ssld", ssld("-o", "optim.learning_rate=0.1"), "optim.learning_rate"),
        Row("ssld-workers-negative", "distill.ssld", ssld("-o", "run.workers=-1"), "run.workers"),
        Row("ssld-lr-negative", "distill.ssld", ssld("-o", "optim.lr=-1"), "optim.lr"),
        Row("ssld-input-size-negative", "distill.ssld", ssld("-o", "data.input_size=-5"), "data.input_size"),
        Row("ssld-crop-scale-one-number", "distill.ssld", ssld("-o", "data.crop_scale=[0.5]"), "data.crop_scale"),
        Row("ssld-teacher-input-size", "distill.ssld",
            ssld("-o", "teacher={models: [timm:test_resnet], input_size: -3}"), "teacher.input_size"),
        Row("ssld-missing-data", "distill.ssld", ssld("-o", f"data.root={root / 'nope'}"), "nope"),
        Row("ssld-teacher-section-on-null", "distill.ssld",
            ssld("-o", f"teacher={{models: [{f['hostile_pt']}]}}", "-o", "loss.kind=ssld"), "hostile.pt"),
        Row("ssld-hostile-teacher", "distill.ssld", ["-c", teacher_cfg], "hostile.pt"),
        Row("ssld-truncated-teacher", "distill.ssld", ["-c", teacher_cfg, "-o", f"teacher.models=[{f['truncated_pt']}]"],
            "truncated.pt"),
        Row("ssld-hostile-student-init", "distill.ssld", ssld("-o", f"student.arch={f['hostile_pt']}"), "hostile.pt"),
        Row("ssld-unwritable-out", "distill.ssld", ssld("--out-dir", f"{UNWRITABLE}/ssld"),
            f"cannot write {UNWRITABLE}"),
        Row("finetune-workers-negative", "transfer.finetune", ft("--workers", "-2"), "workers"),
        Row("finetune-lr-negative", "transfer.finetune", ft("--lr", "-1"), "lr"),
        Row("finetune-image-size-negative", "transfer.finetune", ft("--image-size", "-5"), "image_size"),
        Row("finetune-label-smoothing", "transfer.finetune", ft("--label-smoothing", "2"), "label"),
        Row("finetune-unknown-dataset", "transfer.finetune",
            ["--dataset", "flowers", "--backbone", "timm:test_resnet", "--out-dir", str(root / "ft2")], "flowers"),
        Row("finetune-malformed-yaml", "transfer.finetune", ["-c", str(f["bad_yaml"])], "bad.yaml"),
        Row("finetune-tab-yaml", "transfer.finetune", ["-c", str(f["tab_yaml"])], "tab.yaml"),
        Row("finetune-hostile-backbone", "transfer.finetune",
            ["--dataset", f"folder:{demo_root}", "--backbone", str(f["hostile_pt"]), "--out-dir", str(root / "ft3")],
            "hostile.pt"),
        Row("finetune-download-offline", "transfer.finetune",
            ["--dataset", "cifar10", "--download", "--backbone", "timm:test_resnet", "--data-root", str(root / "dl2"),
             "--out-dir", str(root / "ft4")], "cifar10", env=NO_NETWORK),
        Row("det-train-malformed-yaml", "detection.train", ["-c", str(f["bad_yaml"])], "bad.yaml"),
        Row("det-train-tab-yaml", "detection.train", ["-c", str(f["tab_yaml"])], "tab.yaml"),
        Row("det-train-workers-negative", "detection.train", det("-o", "run.workers=-1"), "run.workers"),
        Row("det-train-all-crowd", "detection.train", det("-o", f"data.train_json={f['coco_all_crowd']}"),
            "no usable box"),
        Row("det-train-coco-not-json", "detection.train", det("-o", f"data.train_json={f['coco_not_json']}"),
            "is not valid JSON"),
        Row("det-train-unwritable-out", "detection.train", det("--out-dir", f"{UNWRITABLE}/det"),
            f"cannot write {UNWRITABLE}"),
    ]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, demo_root):
    root = tmp_path_factory.mktemp("bad_inputs")
    rows, marker = build_catalogue(root / "files", demo_root)
    runnable = [r for r in rows if r.id not in OWNER_FIX and (not r.trainer or r.module in TRAINERS_READY)]
    spec = [dict(id=r.id, module=r.module, args=[str(a) for a in r.args], env=r.env, dir=str(root / "runs" / r.id))
            for r in runnable]
    (root / "rows.json").write_text(json.dumps(spec))
    zygote = root / "zygote.py"
    zygote.write_text(ZYGOTE)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SSLD_HOME=str(root / "home"),
               SSLD_DATA=str(root / "files"))
    subprocess.run([sys.executable, str(zygote), str(root / "rows.json"), str(root / "results.json"),
                    str(ROW_TIMEOUT_S)], env=env, check=True, cwd=root, timeout=ROW_TIMEOUT_S * len(runnable))
    results = json.loads((root / "results.json").read_text())
    return {r.id: r for r in rows}, results, marker, root, env


def _error_lines(stderr: str) -> list[str]:
    """The error report: the one `error:` line and the indented details under it (a list of COCO
    problems); what a command said before it (what it is doing, a skipped image) is not part of it."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    return lines[starts[0]:] if starts else [line for line in lines if line.strip()]


def check(row: Row, result: dict) -> None:
    stderr = result["stderr"]
    where = f"{row.module} {' '.join(map(str, row.args))}\nexit {result['code']}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr, where
    if row.kind == "error":
        lines = _error_lines(stderr)
        assert result["code"] == 2, where
        assert lines and lines[0].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, where
        assert all(ln.startswith("  ") for ln in lines[1:]), where   # details under it, indented, nothing else
        assert row.expect in lines[0] + "\n".join(lines[1:]), where
    else:
        assert result["code"] == 0, where
        assert row.expect in stderr + result["stdout"], where



def _row_ids():
    """Row ids without building files (the ids are fixed by build_catalogue's table)."""
    import ast
    tree = ast.parse(Path(__file__).read_text())
    return [node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "Row" and node.args and isinstance(node.args[0], ast.Constant)]


@pytest.mark.parametrize("row_id", _row_ids())
def test_bad_input_gives_one_line_error_never_a_traceback(catalogue, row_id):
    rows, results, marker, _, _ = catalogue
    row = rows[row_id]
    if row.id in OWNER_FIX:
        pytest.skip(f"needs a change outside this catalogue: {OWNER_FIX[row.id]}")
    if row.trainer and row.module not in TRAINERS_READY:
        pytest.skip(f"{row.module} rows wait for the engine port: add it to TRAINERS_READY")
    check(row, results[row.id])
    assert not marker.exists(), "a hostile pickle ran its payload"


def test_catalogue_is_consistent(catalogue):
    rows = catalogue[0]
    assert set(OWNER_FIX) <= set(rows) and len(rows) == len(_row_ids()) == len(set(_row_ids()))
    assert TRAINERS_READY <= {r.module for r in rows.values() if r.trainer}


def test_rows_fail_fast(catalogue):
    _, results, _, _, _ = catalogue
    slow = {k: r["seconds"] for k, r in results.items() if r["seconds"] > 15}
    assert not slow, f"rows must fail before any training: {slow}"


def test_zygote_matches_a_real_subprocess(catalogue):
    """The fork-from-one-interpreter shortcut reports what `python -m` from a shell reports."""
    rows, results, _, root, env = catalogue
    for row_id in ("mine-input-size-negative", "eval-coco-all-crowd"):
        row = rows[row_id]
        real = subprocess.run([sys.executable, "-m", row.module, *map(str, row.args)], capture_output=True,
                              text=True, env=dict(env, **row.env), cwd=root, timeout=120)
        assert real.returncode == results[row_id]["code"]
        assert _error_lines(real.stderr) == _error_lines(results[row_id]["stderr"])
