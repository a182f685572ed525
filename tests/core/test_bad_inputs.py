"""The demo-data generator (distill.core.demo_data, run as distill.demo_data) over bad values: one `error:`
line, exit 2, never a traceback (the machinery and the shared tests: tests/bad_inputs.py)."""
from bad_inputs import UNWRITABLE, BadFiles, Row, catalogue_fixture, row_test
from bad_inputs import test_catalogue_is_consistent, test_rows_fail_fast  # noqa: F401  (run on this catalogue)


def rows(f: BadFiles) -> list[Row]:
    root = f.root
    return [
        Row("demo-data-negative-count", "distill.demo_data", [str(root / "d1"), "--train-per-class", "-1"],
            "train_per_class"),
        Row("demo-data-negative-size", "distill.demo_data", [str(root / "d2"), "--image-size", "-5"], "image_size"),
        Row("demo-data-too-many-classes", "distill.demo_data", [str(root / "d3"), "--classes", "99"], "classes"),
        Row("demo-data-clutter-range", "distill.demo_data", [str(root / "d4"), "--clutter", "3"], "clutter"),
        Row("demo-data-unwritable", "distill.demo_data", [f"{UNWRITABLE}/demo", "--train-per-class", "1",
                                                          "--val-per-class", "1", "--image-size", "32"],
            f"cannot write {UNWRITABLE}"),
    ]


catalogue = catalogue_fixture(rows)
test_bad_input_gives_one_line_error_never_a_traceback = row_test(rows)
