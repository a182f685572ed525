"""Recipes by name: `-c r50`, `-c detection/cascade_mv3_640`, `-c transfer/flowers102` find the YAML that
ships inside the package (distill/configs in a wheel), or configs/ of the checkout when running from one.

A value that names an existing file is that file, as before; `configs/r50.yaml` from a folder without
it falls back to the recipe `r50`, so the README's commands work after a plain `pip install`.
"""
from __future__ import annotations

import difflib
from pathlib import Path, PurePosixPath

from distill.core.errors import UserError

_HERE = Path(__file__).resolve()
PACKAGED = _HERE.parents[1] / "configs"        # distill/configs: where the wheel puts configs/
CHECKOUT = _HERE.parents[2] / "configs"        # configs/ next to distill/ in a source checkout
SUFFIXES = (".yaml", ".yml")


def recipe_dirs() -> list[Path]:
    """The folders recipes are read from, first match wins: the checkout's (live files), then the packaged."""
    dirs = []
    if CHECKOUT.is_dir() and (CHECKOUT.parent / "pyproject.toml").is_file():  # not a stray site-packages/configs
        dirs.append(CHECKOUT)
    if PACKAGED.is_dir():
        dirs.append(PACKAGED)
    return dirs


def list_recipes() -> list[str]:
    """Every recipe name, e.g. ['demo', ..., 'detection/cascade_mv3_640', ..., 'transfer/flowers102']."""
    names = set()
    for root in recipe_dirs():
        for path in root.rglob("*"):
            if path.suffix in SUFFIXES and path.is_file():
                names.add(path.relative_to(root).with_suffix("").as_posix())
    return sorted(names, key=lambda n: (n.count("/"), n))


def recipe_title(name: str) -> str:
    """The recipe's first comment line: what `python -m distill.zoo --configs` shows next to its name."""
    for line in resolve_recipe(name).read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return ""


def recipe_name(text: str) -> str:
    """'configs/detection/demo.yaml', './configs/r50.yml', 'r50' -> 'detection/demo', 'r50', 'r50'."""
    parts = [p for p in PurePosixPath(str(text).replace("\\", "/")).parts if p != "."]
    if parts[:1] == ["configs"]:  # the README's `-c configs/r50.yaml`, typed outside a checkout
        parts = parts[1:]
    name = "/".join(parts)
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_recipe(text) -> Path:
    """A `-c` value -> the YAML file: an existing path as given, else the recipe of that name."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_absolute():
        raise UserError(f"config file not found: {path}")
    name = recipe_name(text)
    for root in recipe_dirs():
        for suffix in SUFFIXES:
            candidate = root / (name + suffix)
            if candidate.is_file():
                return candidate
    raise UserError(f"config {str(text)!r} is neither a file nor a recipe name; {_near_names(name)}")


def _near_names(name: str) -> str:
    names = list_recipes()
    if not names:
        return "no recipes are installed (reinstall ssld-kit)"
    near = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    by_leaf = {n.rsplit("/", 1)[-1]: n for n in names}
    near += [by_leaf[m] for m in difflib.get_close_matches(name.rsplit("/", 1)[-1], list(by_leaf), n=4, cutoff=0.6)]
    near = list(dict.fromkeys(near))[:4]
    if near:
        return f"did you mean {', '.join(near)}? (python -m distill.zoo --configs lists all {len(names)})"
    return f"python -m distill.zoo --configs lists the {len(names)} recipes"


def format_recipes() -> str:
    """The `python -m distill.zoo --configs` listing: each recipe name with its first comment line."""
    names = list_recipes()
    width = max(map(len, names), default=0)
    lines = [f"{n.ljust(width)}  {recipe_title(n)}".rstrip() for n in names]
    return "\n".join(lines + ["", "pass a name to -c (e.g. -c r50, -c detection/cascade_mv3_640), or a YAML path"])
