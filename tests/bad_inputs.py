"""The machinery of the bad-input catalogue: every CLI over bad files and values gives exit code 2 and one
`error: ...` line, never a traceback (or, for an unreadable image among good ones, a skip that is counted
and the run finishes). The rows live with their package, in tests/PACKAGE/test_bad_inputs.py; each
such file declares `rows(files) -> list[Row]`, takes its `catalogue` fixture and its parametrized row test
from `catalogue_fixture(rows)` and `row_test(rows)`, and imports the shared tests at the end of this module.

The rows run as `python -m MODULE ARGS` in processes forked from one interpreter that has already imported
torch (a "zygote"), shared by every package's catalogue in a pytest session: the module runs as __main__
exactly as from a shell, but a row costs its own work, not another three seconds of imports.
`assert_zygote_matches_a_real_subprocess` checks the two agree.

Trainer rows (distill.ssld, transfer.finetune, detection.train) use the run/-o/--out-dir vocabulary;
a trainer's rows run once its name is in TRAINERS_READY, and are reported as skipped until then.
"""
from __future__ import annotations

import ast
import atexit
import inspect
import json
import os
import select
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Trainers whose rows are enabled. The lead adds a name here when its engine port lands.
TRAINERS_READY: set[str] = {"distill.ssld", "transfer.finetune", "detection.train"}
# Rows that need a change in a file this catalogue's owner does not own: skipped, with the change named.
OWNER_FIX: dict = {}  # rows whose fix is pending in another file (none now): id -> the fix
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
ROW_TIMEOUT_S = 60
UNWRITABLE = "/sys/ssld-kit-bad-inputs"   # refuses even root (chmod does not, and CI runs as root)
TRAINERS = ("distill.ssld", "transfer.finetune", "detection.train")


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
        return self.module in TRAINERS


# ---------------------------------------------------------------------------------------------------
# The bad files more than one package feeds its CLIs; each is written on first use.

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


class BadFiles:
    """The files under `root`, written when a row first asks for one: a package builds only what it feeds.
    `marker` is what a hostile pickle creates when it runs."""

    def __init__(self, root: Path, demo_root: Path):
        self.root, self.demo_root = root, demo_root
        root.mkdir(parents=True, exist_ok=True)
        self.marker = root / "PWNED"

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    def torch_file(self, name: str, obj) -> Path:
        torch.save(obj, self.root / name)
        return self.root / name

    @cached_property
    def bad_yaml(self) -> Path:
        return self.write("bad.yaml", "run: {out_dir: x\ndata: [1, 2\n  - : :\n")

    @cached_property
    def tab_yaml(self) -> Path:
        return self.write("tab.yaml", "run:\n\tout_dir: x\n")

    @cached_property
    def hostile_pt(self) -> Path:
        return self.torch_file("hostile.pt", {"model": Evil(self.marker), "meta": {}})

    @cached_property
    def good_pt(self) -> Path:
        return self.torch_file("good.pt", {"model": {"w": torch.zeros(64, 64)}, "meta": {"arch": "test_resnet"}})

    @cached_property
    def truncated_pt(self) -> Path:
        return self.write("truncated.pt", self.good_pt.read_bytes()[: self.good_pt.stat().st_size // 2])

    @cached_property
    def foreign_pt(self) -> Path:
        return self.torch_file("foreign.pt", torch.arange(10))   # a valid torch file, not a checkpoint

    @cached_property
    def empty_pt(self) -> Path:
        return self.write("empty.pt", b"")

    @cached_property
    def garbage_safetensors(self) -> Path:
        return self.write("garbage.safetensors", os.urandom(256))

    @cached_property
    def corrupt_jpg(self) -> Path:
        return self.write("corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg" * 4)

    @cached_property
    def pool(self) -> Path:
        """Six good images, one corrupt, one decompression bomb."""
        pool = self.root / "pool"
        pool.mkdir()
        for p in sorted((self.demo_root / "train").rglob("*.jpg"))[:6]:
            (pool / p.name).write_bytes(p.read_bytes())
        (pool / "zz_corrupt.jpg").write_bytes(self.corrupt_jpg.read_bytes())
        bomb_png(pool / "zz_bomb.png")
        return pool

    @cached_property
    def bomb(self) -> Path:
        return self.pool / "zz_bomb.png"

    @cached_property
    def empty_dir(self) -> Path:
        (self.root / "empty").mkdir()
        return self.root / "empty"


# ---------------------------------------------------------------------------------------------------
# The zygote: one interpreter for the session, a forked child per row.

ZYGOTE = textwrap.dedent('''
    import io, json, os, runpy, signal, sys, time, traceback
    import numpy, PIL.Image, torch, torchvision, timm, yaml, safetensors  # the slow imports, once
    torch.set_num_threads(1)

    def run_row(row):
        os.chdir(row["dir"])
        os.environ.update(row["env"])
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)       # the request pipe is the zygote's alone
        os.dup2(os.open(row["dir"] + "/stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(row["dir"] + "/stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
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

    def wait(pid, start, timeout):
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.time() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "timeout"
            time.sleep(0.02)

    timeout = float(sys.argv[1])
    for request in iter(sys.stdin.readline, ""):     # a batch a line: its rows file and its results file
        rows_path, results_path = request.split()
        results = {}
        for row in json.load(open(rows_path)):
            os.makedirs(row["dir"], exist_ok=True)
            start = time.time()
            pid = os.fork()
            if pid == 0:
                run_row(row)
            code = wait(pid, start, timeout)
            results[row["id"]] = dict(code=code, seconds=round(time.time() - start, 2),
                                      stdout=open(row["dir"] + "/stdout").read(),
                                      stderr=open(row["dir"] + "/stderr").read())
        json.dump(results, open(results_path, "w"))
        print("done", flush=True)
''')


class Zygote:
    """The zygote process and its request pipe; it exits when the pipe closes (at exit, or if pytest dies)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "zygote.py").write_text(ZYGOTE)
        self.log = folder / "zygote.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, str(folder / "zygote.py"), str(ROW_TIMEOUT_S)],
                                         env=env, cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True)

    def run(self, specs: list[dict], folder: Path) -> dict:
        rows_path, results_path = folder / "rows.json", folder / "results.json"
        rows_path.write_text(json.dumps(specs))
        self.proc.stdin.write(f"{rows_path} {results_path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], ROW_TIMEOUT_S * (len(specs) + 1))
        if not ready or self.proc.stdout.readline().strip() != "done":
            raise RuntimeError(f"the zygote did not finish its batch: {self.log}:\n{self.log.read_text()}")
        return json.loads(results_path.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_zygote: Zygote | None = None


def shared_zygote(tmp_path_factory) -> Zygote:
    global _zygote
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = Zygote(tmp_path_factory.mktemp("zygote"))
        atexit.register(_zygote.close)
    return _zygote


# ---------------------------------------------------------------------------------------------------
# A package's catalogue: its files, its rows, their results.

@dataclass
class Catalogue:
    source: Path           # the test file that declares the rows
    rows: dict             # id -> Row
    results: dict          # id -> code, seconds, stdout, stderr
    marker: Path
    root: Path
    env: dict              # what a row's process sees, less the row's own env


def runnable(row: Row) -> bool:
    return row.id not in OWNER_FIX and (not row.trainer or row.module in TRAINERS_READY)


def run_catalogue(tmp_path_factory, demo_root: Path, rows_of) -> Catalogue:
    """Build the files `rows_of(files)` asks for and run its rows in the shared zygote."""
    root = tmp_path_factory.mktemp("bad_inputs")
    files = BadFiles(root / "files", demo_root)
    rows = rows_of(files)
    row_env = dict(SSLD_HOME=str(root / "home"), SSLD_DATA=str(root / "files"))
    specs = [dict(id=r.id, module=r.module, args=[str(a) for a in r.args], env={**row_env, **r.env},
                  dir=str(root / "runs" / r.id)) for r in rows if runnable(r)]
    results = shared_zygote(tmp_path_factory).run(specs, root)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **row_env)
    return Catalogue(Path(inspect.getfile(rows_of)), {r.id: r for r in rows}, results, files.marker, root, env)


def catalogue_fixture(rows_of):
    """The module-scoped `catalogue` fixture of a package's test file: its rows, run once."""
    @pytest.fixture(scope="module", name="catalogue")
    def catalogue(tmp_path_factory, demo_root):
        return run_catalogue(tmp_path_factory, demo_root, rows_of)
    return catalogue


def row_test(rows_of):
    """The parametrized row test of a package's test file, one case a row `rows_of` declares."""
    @pytest.mark.parametrize("row_id", row_ids(inspect.getfile(rows_of)))
    def test_bad_input_gives_one_line_error_never_a_traceback(catalogue, row_id):
        check_row(catalogue, row_id)
    return test_bad_input_gives_one_line_error_never_a_traceback


def declared_rows(test_file) -> list[tuple[str, str]]:
    """(id, module) of every Row written in a test file, read without building files, for parametrize."""
    tree = ast.parse(Path(test_file).read_text())
    return [(node.args[0].value, node.args[1].value) for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "Row" and len(node.args) > 1
            and all(isinstance(a, ast.Constant) for a in node.args[:2])]


def row_ids(test_file) -> list[str]:
    return [row_id for row_id, _ in declared_rows(test_file)]


# ---------------------------------------------------------------------------------------------------
# Checks

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


def check_row(catalogue: Catalogue, row_id: str) -> None:
    row = catalogue.rows[row_id]
    if row.id in OWNER_FIX:
        pytest.skip(f"needs a change outside this catalogue: {OWNER_FIX[row.id]}")
    if row.trainer and row.module not in TRAINERS_READY:
        pytest.skip(f"{row.module} rows wait for the engine port: add it to TRAINERS_READY")
    check(row, catalogue.results[row.id])
    assert not catalogue.marker.exists(), "a hostile pickle ran its payload"


def assert_zygote_matches_a_real_subprocess(catalogue: Catalogue, row_id: str) -> None:
    """The fork-from-one-interpreter shortcut reports what `python -m` from a shell reports."""
    row = catalogue.rows[row_id]
    real = subprocess.run([sys.executable, "-m", row.module, *map(str, row.args)], capture_output=True,
                          text=True, env=dict(catalogue.env, **row.env), cwd=catalogue.root, timeout=120)
    assert real.returncode == catalogue.results[row_id]["code"]
    assert _error_lines(real.stderr) == _error_lines(catalogue.results[row_id]["stderr"])


# Shared tests: each package's test file imports them, so they run against its own `catalogue` fixture.

def test_catalogue_is_consistent(catalogue):
    """The rows built are the rows declared; ids are unique across every package's catalogue; OWNER_FIX and
    TRAINERS_READY name rows and trainers that exist."""
    assert sorted(catalogue.rows) == sorted(row_ids(catalogue.source))   # a duplicate id differs in length
    everywhere = [row for path in sorted(REPO.glob("tests/*/test_bad_inputs.py")) for row in declared_rows(path)]
    ids = [row_id for row_id, _ in everywhere]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert set(OWNER_FIX) <= set(ids)
    assert TRAINERS_READY <= {module for _, module in everywhere if module in TRAINERS}


def test_rows_fail_fast(catalogue):
    slow = {k: r["seconds"] for k, r in catalogue.results.items() if r["seconds"] > 15}
    assert not slow, f"rows must fail before any training: {slow}"
