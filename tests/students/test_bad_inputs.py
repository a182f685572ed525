"""distill.convert and distill.zoo over bad files and values: one `error:` line, exit 2, never a traceback
(the machinery and the shared tests: tests/bad_inputs.py)."""
import os
import pickle

from bad_inputs import NO_NETWORK, BadFiles, Evil, Row, catalogue_fixture, row_test
from bad_inputs import test_catalogue_is_consistent, test_rows_fail_fast  # noqa: F401  (run on this catalogue)


def rows(f: BadFiles) -> list[Row]:
    root = f.root
    hostile = f.write("hostile.pdparams", pickle.dumps({"conv1_weights": Evil(f.marker)}))
    truncated = f.write("truncated.pdparams", pickle.dumps({"conv1_weights": list(range(100))})[:40])
    garbage = f.write("garbage.pdparams", os.urandom(300))
    convert = lambda src: [str(src), "--arch", "r18_vd", "-o", str(root / "c.safetensors")]
    return [
        Row("convert-hostile-pdparams", "distill.convert", convert(hostile), "hostile.pdparams"),
        Row("convert-truncated-pdparams", "distill.convert", convert(truncated), "truncated.pdparams"),
        Row("convert-garbage-pdparams", "distill.convert", convert(garbage), "garbage.pdparams"),
        Row("convert-missing-file", "distill.convert", [str(root / "nope.pdparams"), "--arch", "r18_vd"],
            "nope.pdparams"),
        Row("convert-unknown-arch", "distill.convert", [str(garbage), "--arch", "r999_vd"], "r999_vd"),
        Row("convert-download-offline", "distill.convert", ["--download", "ResNet50_vd_ssld"], "ResNet50_vd_ssld",
            env=NO_NETWORK),
        Row("zoo-unknown-flag", "distill.zoo", ["--bogus"], "--bogus"),
    ]


catalogue = catalogue_fixture(rows)
test_bad_input_gives_one_line_error_never_a_traceback = row_test(rows)
