"""distill.mine and its dedup over bad files and values: one `error:` line, exit 2, never a traceback
(the machinery and the shared tests: tests/bad_inputs.py)."""
from bad_inputs import UNWRITABLE, BadFiles, Row, assert_zygote_matches_a_real_subprocess, catalogue_fixture, \
    row_test
from bad_inputs import test_catalogue_is_consistent, test_rows_fail_fast  # noqa: F401  (run on this catalogue)

TEACHER = ["--teacher", "timm:test_resnet", "--num-classes", "4", "--input-size", "32", "--device", "cpu",
           "--workers", "0", "--no-progress"]


def rows(f: BadFiles) -> list[Row]:
    root, pool = f.root, f.pool
    mine = lambda *a, t=TEACHER: ["--pool", str(pool), "--k", "2", "-o", str(root / "mined" / "m.txt"), *t, *a]
    with_teacher = lambda src: ["--teacher", str(src), *TEACHER[2:]]
    dedup_args = lambda *a: ["dedup", "--pool", str(pool), "--against", str(f.demo_root / "val"),
                             "-o", str(root / "dedup" / "kept.txt"), *TEACHER[:-1], *a]
    return [
        Row("mine-missing-pool", "distill.mine", ["--pool", str(root / "nope"), "--k", "2", "-o", "m.txt", *TEACHER],
            "pool not found"),
        Row("mine-empty-pool", "distill.mine", ["--pool", str(f.empty_dir), "--k", "2", "-o", "m.txt", *TEACHER],
            str(f.empty_dir)),
        Row("mine-input-size-negative", "distill.mine", mine("--input-size", "-3"), "argument --input-size"),
        Row("mine-workers-negative", "distill.mine", mine("--workers", "-1"), "argument --workers"),
        Row("mine-k-zero", "distill.mine", mine("--k", "0"), "argument --k"),
        Row("mine-batch-size-text", "distill.mine", mine("--batch-size", "many"), "argument --batch-size"),
        Row("mine-unknown-flag", "distill.mine", mine("--topk", "3"), "unrecognized arguments: --topk"),
        Row("mine-hostile-teacher", "distill.mine", mine(t=with_teacher(f.hostile_pt)), str(f.hostile_pt)),
        Row("mine-truncated-teacher", "distill.mine", mine(t=with_teacher(f.truncated_pt)), str(f.truncated_pt)),
        Row("mine-foreign-teacher", "distill.mine", mine(t=with_teacher(f.foreign_pt)), str(f.foreign_pt)),
        Row("mine-empty-teacher", "distill.mine", mine(t=with_teacher(f.empty_pt)), str(f.empty_pt)),
        Row("mine-garbage-artifact", "distill.mine", mine(t=with_teacher(f.garbage_safetensors)),
            str(f.garbage_safetensors)),
        Row("mine-unknown-teacher", "distill.mine", mine(t=with_teacher("timm:no_such_net")), "no_such_net"),
        Row("mine-missing-class-names", "distill.mine", mine("--class-names", str(root / "nope.txt")),
            "--class-names"),
        Row("mine-missing-exclude", "distill.mine", mine("--exclude", str(root / "nope.tsv")), "--exclude"),
        Row("mine-unwritable-out", "distill.mine",
            ["--pool", str(pool), "--k", "2", "-o", f"{UNWRITABLE}/m.txt", *TEACHER], f"cannot write {UNWRITABLE}"),
        Row("mine-corrupt-and-bomb-skipped", "distill.mine", mine(), "2 unreadable skipped", kind="skip"),
        # distill.mine dedup
        Row("dedup-untrained-teacher", "distill.mine", dedup_args(), "needs a trained teacher"),
        Row("dedup-cos-out-of-range", "distill.mine", dedup_args("--cos", "2"), "argument --cos"),
        Row("dedup-ratio-zero", "distill.mine", dedup_args("--ratio", "0"), "argument --ratio"),
        Row("dedup-missing-against", "distill.mine",
            ["dedup", "--pool", str(pool), "--against", str(root / "nope"), "-o", "k.txt", *TEACHER[:-1]],
            "--against"),
    ]


catalogue = catalogue_fixture(rows)
test_bad_input_gives_one_line_error_never_a_traceback = row_test(rows)


def test_zygote_matches_a_real_subprocess(catalogue):
    assert_zygote_matches_a_real_subprocess(catalogue, "mine-input-size-negative")
