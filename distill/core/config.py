"""YAML configs shared by every CLI: `-c FILE`, `-o key.sub=value` overrides, `_base_` inheritance, validation.

The schema is a defaults mapping (from code or a YAML file): a key that is not in it is an error that
suggests the nearest valid key, and a value whose type differs from the default's is an error naming the
key and the expected type. A default of None accepts any value.
"""
from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from distill.core.errors import UserError
from distill.core.recipes import resolve_recipe


class ConfigError(UserError):
    pass


class Config(dict):
    """A dict whose keys read as attributes too (cfg.optim.lr), recursively."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value

    @staticmethod
    def wrap(value):
        if isinstance(value, Mapping):
            return Config({k: Config.wrap(v) for k, v in value.items()})
        if isinstance(value, list):
            return [Config.wrap(v) for v in value]
        return value

    def to_dict(self) -> dict:
        return yaml.safe_load(yaml.safe_dump(_plain(self)))


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {path}{_yaml_where(e)}: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """yaml's message in one line: the problem (and what it was parsing), without the quoted source."""
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    text = "; ".join(p for p in parts if p) or str(e).splitlines()[0]
    return " ".join(text.split())


def merge(base: dict, update: Mapping) -> dict:
    """Deep merge: mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_with_bases(path, _seen: tuple = ()) -> dict:
    """Read a YAML file, resolving `_base_` (a path or list of paths, relative to the file) first."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"_base_ cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    data = read_yaml(path)
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for base in bases:
        merged = merge(merged, load_yaml_with_bases(path.parent / base, (*_seen, path)))
    return merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return cfg


def _type_name(value) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__)


def _all_keys(schema: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for k, v in schema.items():
        keys.append(prefix + k)
        if isinstance(v, Mapping) and v:
            keys += _all_keys(v, prefix + k + ".")
    return keys


def validate(cfg: Mapping, schema: Mapping, source: str = "config", _prefix: str = "", _root=None,
             renamed: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for unknown keys and type mismatches (int is accepted where a float is expected).
    `renamed` maps a retired dotted key to the one line that names its successor."""
    root = schema if _root is None else _root
    for key, value in cfg.items():
        dotted = _prefix + str(key)
        if renamed and dotted in renamed:
            raise ConfigError(f"'{dotted}' in {source}: {renamed[dotted]}")
        if key not in schema:
            near = difflib.get_close_matches(dotted, _all_keys(root), n=1, cutoff=0.6)
            if not near:
                near = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.5)
                near = [_prefix + near[0]] if near else []
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys here: {', '.join(sorted(map(str, schema)))}"
            raise ConfigError(f"unknown key '{dotted}' in {source}{hint}")
        expected = schema[key]
        if expected is None or value is None:
            continue
        if isinstance(expected, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{dotted}' in {source} must be a mapping, got {_type_name(value)} {value!r}")
            if expected:  # an empty default mapping accepts free-form content
                validate(value, expected, source, dotted + ".", root, renamed)
            continue
        ok = isinstance(value, type(expected)) and not (isinstance(value, bool) and not isinstance(expected, bool))
        if isinstance(expected, float) and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"'{dotted}' in {source} must be {_type_name(expected)} (like {expected!r}), "
                              f"got {_type_name(value)} {value!r}")


def _as_float(value):
    """YAML 1.1 reads `1e-3` (no dot) as a string: accept it, and ints, where a float is expected."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce_floats(cfg: dict, schema: Mapping) -> dict:
    for key, value in cfg.items():
        expected = schema.get(key) if isinstance(schema, Mapping) else None
        if isinstance(expected, float):
            cfg[key] = _as_float(value)
        elif isinstance(expected, Mapping) and isinstance(value, dict):
            _coerce_floats(value, expected)
    return cfg


def nest(flat: Mapping[str, Any]) -> dict:
    """{"optim.lr": 0.1} -> {"optim": {"lr": 0.1}}; None values (flags not given) are left out."""
    out: dict = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        node = out
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def load_config(path=None, overrides: Iterable[str] = (), defaults: Mapping | str | Path = None,
                flags: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None) -> Config:
    """defaults <- path (with its _base_ chain) <- command-line flags ({dotted key: value}) <- -o overrides,
    each layer validated against the defaults (`renamed`: retired keys and what replaced them)."""
    if isinstance(defaults, (str, Path)):
        defaults = read_yaml(defaults)
    defaults = dict(defaults or {})
    if path:
        path = resolve_recipe(path)  # a file, or a recipe name (-c r50, -c detection/demo)
    user = load_yaml_with_bases(path) if path else {}
    source = str(path) if path else "defaults"
    if defaults:
        validate(_coerce_floats(user, defaults), defaults, source, renamed=renamed)
    cfg = merge(defaults, user)
    overrides = list(overrides or [])
    # -o last: it names a key outright, so "rerun with -o KEY=VALUE" wins over a shorthand flag for that key
    for layer, name in ((nest(flags or {}), "command-line flags"),
                        (apply_overrides({}, overrides) if overrides else {}, "-o overrides")):
        if layer:
            if defaults:
                validate(_coerce_floats(layer, defaults), defaults, name, renamed=renamed)
            cfg = merge(cfg, layer)
    return Config.wrap(cfg)


def add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("-c", "--config", required=required,
                        help="YAML config file or recipe name (python -m distill.zoo --configs lists them)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. -o optim.lr=0.1 (repeatable; typed by YAML)")


def add_trainer_args(parser: argparse.ArgumentParser, config_required: bool = False) -> None:
    """The grammar every trainer shares: -c FILE, -o KEY=VALUE, --out-dir DIR, --restart."""
    add_config_args(parser, required=config_required)
    parser.add_argument("--out-dir", dest="run.out_dir", metavar="DIR", help="the run folder (run.out_dir)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the run folder's checkpoint and start over (rerunning resumes by default)")
