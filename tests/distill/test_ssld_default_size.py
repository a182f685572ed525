"""Item 7 in distill.ssld: without data.input_size a fresh student.arch trains at the data's own size (it has
no pretrained resolution), a student.init at the init's training size; the run prints where it came from."""
from distill import ssld
from distill.core.config import load_config
from helpers import make_artifact, tiny_config, write_config


def checked(tmp_path, demo_root, **sections):
    cfg = tiny_config(tmp_path, demo_root, **sections)
    cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in ("input_size", "test_input_size")}
    return ssld.check(load_config(write_config(tmp_path, cfg), [], ssld.DEFAULTS, renamed=ssld.RENAMED))


def test_fresh_student_takes_the_data_size_and_an_init_its_own(tmp_path, demo_root, capsys):
    fresh = checked(tmp_path, demo_root)
    assert fresh.data.input_size == 64 and ssld.student_preprocessing(fresh)["test_input_size"] == 72   # the demo scenes are 64 px
    assert "data.input_size 64 px (the data's own size: median shorter side 64 px" in capsys.readouterr().err
    init = make_artifact(tmp_path / "init.safetensors", num_classes=4)  # trained at 32 px
    from_init = checked(tmp_path, demo_root, student=dict(arch=None, init=str(init)))
    assert from_init.data.input_size == 32 and f"student.init {init}'s input_size" in capsys.readouterr().err
    given = tiny_config(tmp_path, demo_root)
    cfg = ssld.check(load_config(write_config(tmp_path, given, "given.yaml"), [], ssld.DEFAULTS, renamed=ssld.RENAMED))
    assert cfg.data.input_size == 32 and "data.input_size" not in capsys.readouterr().err
