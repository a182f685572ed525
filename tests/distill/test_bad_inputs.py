"""distill.ssld, distill.demo and distill.chain over bad files and values: one `error:` line, exit 2, never a
traceback (the machinery and the shared tests: tests/bad_inputs.py)."""
import shutil

from bad_inputs import UNWRITABLE, BadFiles, Row, catalogue_fixture, row_test
from bad_inputs import test_catalogue_is_consistent, test_rows_fail_fast  # noqa: F401  (run on this catalogue)
from helpers import make_named_artifact, tiny_config, write_config

CHAIN_OUT = "chain_out"   # every chain row writes here, and must leave nothing


def chain_files(f: BadFiles) -> dict:
    """DATA whose val/ names another class, a pool of broken images, a teacher of 8 fruit classes."""
    root, demo = f.root, f.demo_root
    split = root / "chain_split"
    for where, classes in (("train", ("circle", "square")), ("val", ("circle", "star"))):
        for c in classes:
            (split / where / c).mkdir(parents=True)
            shutil.copy(next((demo / "train").rglob("*.jpg")), split / where / c / "a.jpg")
    broken = root / "chain_broken_pool"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.jpg").write_bytes(f.corrupt_jpg.read_bytes())
    return dict(split=split, broken=broken, fruit=make_named_artifact(root / "fruit_teacher.safetensors"))


def chain(f: BadFiles, *args, data=None):
    return [str(f.root / CHAIN_OUT), "--data", str(data or f.demo_root), "--teacher", "timm:test_resnet",
            "--student", "timm:test_resnet", *map(str, args)]


def rows(f: BadFiles) -> list[Row]:
    root, demo_root = f.root, f.demo_root
    cfg = write_config(root, tiny_config(root, demo_root, name="ssld"), name="ssld.yaml")
    ssld = lambda *a: ["-c", cfg, *a]
    teacher_cfg = write_config(root, tiny_config(root, demo_root, name="ssld_t", loss=dict(kind="ssld"),
                                                 teacher=dict(models=[str(f.hostile_pt)])), name="ssld_t.yaml")
    c = chain_files(f)
    return [
        Row("chain-data-without-train", "distill.chain", chain(f, data=f.empty_dir), "has no train/ folder"),
        Row("chain-split-classes-differ", "distill.chain", chain(f, data=c["split"]), "only in val/: star"),
        Row("chain-teacher-other-classes", "distill.chain",
            [*chain(f), "--teacher", c["fruit"], "--teacher-finetune", "no"], "was trained on other classes"),
        Row("chain-empty-pool", "distill.chain", chain(f, "--unlabeled", f.empty_dir), "holds no images"),
        Row("chain-unreadable-pool", "distill.chain", chain(f, "--unlabeled", c["broken"]), "could be read"),
        Row("chain-student-unresolved", "distill.chain", [*chain(f), "--student", "no_such_student"],
            "--student no_such_student does not resolve"),
        Row("chain-student-unknown-timm", "distill.chain", [*chain(f), "--student", "timm:resnet_9000"],
            "unknown timm model"),
        Row("chain-bad-step-override", "distill.chain", chain(f, "-o", "nowhere.lr=1"), "STEP.KEY=VALUE"),
        Row("chain-unwritable-out", "distill.chain", [f"{UNWRITABLE}/chain", *chain(f)[1:]],
            f"cannot write {UNWRITABLE}"),
        Row("demo-unwritable", "distill.demo", [f"{UNWRITABLE}/demo"], f"cannot write {UNWRITABLE}"),
        Row("demo-bad-until", "distill.demo", [str(root / "demo_run"), "--until", "nowhere"], "--until"),
        Row("ssld-malformed-yaml", "distill.ssld", ["-c", str(f.bad_yaml)], "bad.yaml"),
        Row("ssld-tab-yaml", "distill.ssld", ["-c", str(f.tab_yaml)], "tab.yaml"),
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
            ssld("-o", f"teacher={{models: [{f.hostile_pt}]}}", "-o", "loss.kind=ssld"), "hostile.pt"),
        Row("ssld-hostile-teacher", "distill.ssld", ["-c", teacher_cfg], "hostile.pt"),
        Row("ssld-truncated-teacher", "distill.ssld", ["-c", teacher_cfg, "-o", f"teacher.models=[{f.truncated_pt}]"],
            "truncated.pt"),
        Row("ssld-hostile-student-init", "distill.ssld", ssld("-o", f"student.arch={f.hostile_pt}"), "hostile.pt"),
        Row("ssld-unwritable-out", "distill.ssld", ssld("--out-dir", f"{UNWRITABLE}/ssld"),
            f"cannot write {UNWRITABLE}"),
    ]


catalogue = catalogue_fixture(rows)
test_bad_input_gives_one_line_error_never_a_traceback = row_test(rows)


def test_chain_rows_leave_nothing_behind(catalogue):
    """A refused chain writes nothing: every check runs before the first file."""
    assert not (catalogue.root / "files" / CHAIN_OUT).exists()
