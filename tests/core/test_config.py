import subprocess
import sys

import pytest

from distill.core.config import ConfigError, load_config
from distill.core.errors import UserError

DEFAULTS = {"model": {"name": "r50_vd", "num_classes": 1000},
            "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "mult": [1.0, 1.0, 1.0, 1.0, 1.0]},
            "epochs": 10, "teacher": None, "extra": {}}


def write(path, text):
    path.write_text(text)
    return path


def test_base_inheritance_and_typed_overrides(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 0.4\n  momentum: 0.8\nepochs: 360\n")
    cfg_file = write(tmp_path / "child.yaml", "_base_: base.yaml\noptim:\n  lr: 0.2\n")
    cfg = load_config(cfg_file, ["epochs=5", "optim.nesterov=true", "teacher=[a, b]", "optim.mult=[0,1,1,1,2]"],
                      DEFAULTS)
    assert cfg.optim.lr == 0.2            # child beats base
    assert cfg.optim.momentum == 0.8      # base beats defaults
    assert cfg.model.name == "r50_vd"     # defaults fill the rest
    assert cfg.epochs == 5 and isinstance(cfg.epochs, int)
    assert cfg.optim.nesterov is True
    assert cfg.teacher == ["a", "b"]      # None default accepts anything
    assert cfg.optim.mult == [0, 1, 1, 1, 2]


def test_int_is_accepted_and_coerced_where_float_expected(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "optim:\n  lr: 1\n"), [], DEFAULTS)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_exponent_without_dot_reads_as_float(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a float-typed key accepts it, from a file and from -o
    cfg = load_config(write(tmp_path / "c.yaml", "optim:\n  lr: 1e-3\n"), ["optim.momentum=5e-1"], DEFAULTS)
    assert cfg.optim.lr == 1e-3 and cfg.optim.momentum == 0.5


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(write(tmp_path / "c.yaml", "optim:\n  lrr: 0.1\n"), [], DEFAULTS)
    with pytest.raises(ConfigError, match=r"unknown key 'epoch'.*did you mean 'epochs'"):
        load_config(None, ["epoch=3"], DEFAULTS)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim\.lr'.*must be float.*got str 'fast'"):
        load_config(write(tmp_path / "c.yaml", "optim:\n  lr: fast\n"), [], DEFAULTS)
    with pytest.raises(ConfigError, match=r"'epochs'.*must be int.*got bool"):
        load_config(None, ["epochs=true"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"'optim' .*must be a mapping"):
        load_config(None, ["optim=3"], DEFAULTS)


def test_malformed_missing_and_cyclic_files(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(write(tmp_path / "bad.yaml", "optim: [unclosed\n"), [], DEFAULTS)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", [], DEFAULTS)
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml", [], DEFAULTS)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["epochs"], DEFAULTS)


def test_free_form_section_accepts_any_keys():
    cfg = load_config(None, ["extra.anything=1"], DEFAULTS)
    assert cfg.extra.anything == 1


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = write(tmp_path / "bad.yaml", "optim:\n  lrr: 0.1\n")
    code = ("import sys; from distill.core.config import load_config; from distill.core.errors import run_cli;"
            f"run_cli(lambda a: load_config({str(bad)!r}, [], {DEFAULTS!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: unknown key 'optim.lrr'")
