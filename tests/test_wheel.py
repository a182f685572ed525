"""A plain install works from any folder: the wheel carries every module and every recipe, its console
scripts run, and recipe names resolve to the installed YAML, never to the checkout's.

The wheel is built offline (--no-build-isolation) and installed with --no-deps into a fresh venv that
sees the outer environment's packages (torch, timm, ...) through a folder of links, which leaves out
this checkout's editable install, so nothing of the checkout can leak in.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "configs", "distill", "transfer", "detection")
OWN = ("ssld_kit", "__editable__", "distill", "transfer", "detection", "easy-install.pth", "ssld-kit")


def run(cmd, cwd, env=None, check=True):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"{cmd} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build from a copy of the working tree: an in-tree build would leave build/ in the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(src)], cwd=src)
    (path,) = dist.glob("ssld_kit-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv: the wheel installed into it, the outer packages (minus this project) linked in."""
    base = tmp_path_factory.mktemp("venv")
    env_dir = base / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=base)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=base).stdout.strip())
    links = base / "outer"
    links.mkdir()
    outer = {Path(sysconfig.get_path(k)) for k in ("purelib", "platlib")}
    for folder in outer:
        for entry in folder.iterdir():
            if not entry.name.startswith(OWN) and not (links / entry.name).exists():
                (links / entry.name).symlink_to(entry)
    (site / "outer_packages.pth").write_text(f"{links}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               SSLD_HOME=str(base / "ssld_home"))
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=base, env=env)
    elsewhere = base / "elsewhere"   # not the checkout, no configs/ here
    elsewhere.mkdir()
    return dict(python=str(python), site=site, env=env, cwd=elsewhere, bin=env_dir / "bin")


def test_the_wheel_holds_every_module_and_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for pkg in ("distill", "transfer", "detection")
               for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert modules and modules <= names, f"not in the wheel (add to pyproject packages): {sorted(modules - names)}"
    recipes = {"distill/configs/" + p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert len(recipes) > 20 and recipes <= names, sorted(recipes - names)
    assert not any(n.startswith(("tests/", "configs/")) for n in names)


def test_installed_package_runs_from_any_folder_with_its_own_recipes(venv):
    script = textwrap.dedent("""
        import importlib, importlib.metadata as md, json, pkgutil, sys
        import distill, transfer, detection
        from distill.core.config import load_yaml_with_bases
        from distill.core.errors import UserError
        from distill.core.recipes import list_recipes, resolve_recipe
        for pkg in (distill, transfer, detection):   # every module imports without the checkout
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if not m.name.startswith("distill.configs"):
                    importlib.import_module(m.name)
        scripts = [e for e in md.distribution("ssld-kit").entry_points if e.group == "console_scripts"]
        for e in scripts:
            assert callable(e.load()), e
        try:
            resolve_recipe("detection/cascade_mv3_64")
            near = None
        except UserError as e:
            near = str(e)
        print(json.dumps(dict(
            files=[m.__file__ for m in (distill, transfer, detection)],
            recipes=list_recipes(), scripts=sorted(e.name for e in scripts),
            by_name={n: str(resolve_recipe(n)) for n in ("r50", "detection/cascade_mv3_640",
                                                         "transfer/flowers102", "configs/demo.yaml")},
            r50_fix=load_yaml_with_bases(resolve_recipe("r50_fix")), near=near)))
    """)
    out = json.loads(run([venv["python"], "-c", script], cwd=venv["cwd"], env=venv["env"]).stdout)
    site = str(venv["site"])
    assert all(f.startswith(site) for f in out["files"]), out["files"]        # the wheel, not the checkout
    assert {"r50", "mv3", "demo", "detection/cascade_mv3_640", "transfer/flowers102"} <= set(out["recipes"])
    for name, path in out["by_name"].items():
        assert path.startswith(str(venv["site"] / "distill" / "configs")), (name, path)
    assert out["by_name"]["configs/demo.yaml"].endswith("distill/configs/demo.yaml")
    r50 = json.loads(run([venv["python"], "-c", "import json, yaml; from distill.core.recipes import resolve_recipe;"
                          "print(json.dumps(yaml.safe_load(resolve_recipe('r50').read_text())))"],
                         cwd=venv["cwd"], env=venv["env"]).stdout)
    # _base_ chains resolve inside the installed recipes (r50_fix -> r50_ft -> r50)
    assert "_base_" not in out["r50_fix"] and out["r50_fix"]["teacher"]["models"] == r50["teacher"]["models"]
    assert "did you mean detection/cascade_mv3_640" in out["near"]
    assert {"ssld-distill", "ssld-demo", "ssld-finetune", "ssld-detect-train", "ssld-zoo"} <= set(out["scripts"])


def test_console_scripts_and_python_m_run_the_demo_step_elsewhere(venv):
    data = venv["cwd"] / "demo_data"
    run([str(venv["bin"] / "ssld-demo-data"), str(data), "--classes", "2", "--train-per-class", "2",
         "--val-per-class", "1", "--image-size", "32"], cwd=venv["cwd"], env=venv["env"])
    assert len(list((data / "train").rglob("*.jpg"))) == 4 and (data / "annotations").is_dir()
    zoo = run([venv["python"], "-m", "distill.zoo"], cwd=venv["cwd"], env=venv["env"]).stdout
    assert "r50_vd " in zoo and "mv3_large " in zoo
    bad = run([str(venv["bin"] / "ssld-demo-data"), str(data), "--classes", "99"], cwd=venv["cwd"],
              env=venv["env"], check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_the_demo_and_the_chain_run_from_a_plain_install_elsewhere(venv):
    """README's main command reads its recipes from the installed package, not from a checkout's configs/
    (the demo once stopped at its teacher step with "run the demo from a checkout of ssld-kit")."""
    env = dict(venv["env"], OMP_NUM_THREADS="1")
    out = venv["cwd"] / "demo_run"
    run([venv["python"], "-m", "distill.demo", str(out), "--scale", "tiny", "--until", "teacher", "--quiet",
         "--threads", "1"], cwd=venv["cwd"], env=env)
    teacher = out / "teacher" / "demo_teacher.safetensors"
    assert teacher.is_file() and not (out / "student").exists()
    plan = run([str(venv["bin"] / "ssld-chain"), str(venv["cwd"] / "chain_run"), "--data", str(out / "data"),
                "--teacher", str(teacher), "--student", "timm:test_resnet", "--until", "data"],
               cwd=venv["cwd"], env=env)
    assert "used as given (its 8 class names are DATA's" in plan.stderr and "image_size 32 (" in plan.stderr
