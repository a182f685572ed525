"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A crash or kill mid-write leaves the previous file untouched (os.replace is atomic on POSIX). The
temporary is `.NAME.HOST-PID.RANDOM.tmp`; a later write to the same target removes the temporaries that
killed writers left behind (see `remove_stale_temporaries`). A failed write (permission denied, disk full)
raises `OutputError` naming the target, which `distill.core.errors.run_cli` prints as one line.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

# A temporary not modified for this long has no live writer, whatever its name says: a writer touches its
# file continuously and renames it within seconds of the last byte.
STALE_SECONDS = 3600.0
# Errors that mean "this output location cannot take the file" (not a bug): reported in one line.
OUTPUT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
# What torch.save raises on a short write (it never reports the errno): the disk or quota filled up.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")
_PROCESS_START = time.time()
_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"


class OutputError(OSError):
    """A write that the file system refused; `filename` is the target (never the temporary)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def is_torch_write_failure(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_FAILURES)


def refused_errno(e: BaseException) -> int | None:
    """The errno of a write the file system refused, also where a library hides it in its message
    (safetensors: `I/O error: No space left on device (os error 28)`); None for anything else."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(e))
        code = int(found.group(1)) if found else None
    return code if code in OUTPUT_ERRNOS else None


def current_umask() -> int:
    """The process umask without changing it where Linux says it (/proc); else the set-and-restore dance."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


_WRITER = re.compile(r"\.(?P<host>[^.]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _writer_of(name: str) -> tuple[str, int] | None:
    """(host, pid) encoded in a temporary's name, or None for a name from an older version."""
    found = _WRITER.search(name)
    return (found["host"], int(found["pid"])) if found else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by someone else
        return True
    return True


def _is_stale(tmp: Path, now: float) -> bool:
    """The rule of `remove_stale_temporaries`, for one file."""
    try:
        mtime = tmp.stat().st_mtime
    except OSError:
        return False
    if now - mtime > STALE_SECONDS:
        return True
    writer = _writer_of(tmp.name)
    if writer is None:
        return mtime < _PROCESS_START
    host, pid = writer
    return host == _HOST and pid != os.getpid() and not _pid_alive(pid)


def _remove_stale(candidates) -> list[Path]:
    now, removed = time.time(), []
    for tmp in candidates:
        if _is_stale(tmp, now):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def remove_stale_temporaries(path) -> list[Path]:
    """Remove the `.NAME.*.tmp` temporaries of `path` that no live writer holds; returns those removed.

    Rule, safe with concurrent writers (other ranks, other nodes on a shared file system): a temporary is
    stale when its writer (host and pid in its name) is this host's process that no longer exists, or when
    nobody has modified it for STALE_SECONDS. This process's own temporaries and a live process's are kept.
    A temporary from an older version (no writer in the name) is stale once older than this process."""
    path = Path(path)
    prefix = _temporary_prefix(path)
    try:
        return _remove_stale(p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp"))
    except OSError:
        return []


def remove_stale_temporaries_in(folder) -> list[Path]:
    """The same rule for every atomic-write temporary (`.*.tmp`) directly in `folder`: for a run folder at
    start-up, so that a target never written again does not keep its killed writer's temporary."""
    try:
        return _remove_stale(p for p in Path(folder).iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")
                             and p.is_file())
    except OSError:
        return []


def _output_error(e: BaseException, path: Path) -> OutputError | None:
    """The one-line form of a refused write, or None when `e` is something else (a bug, a bad value)."""
    if isinstance(e, OutputError):
        return e
    code = refused_errno(e)
    if code is not None:
        return OutputError(code, os.strerror(code).lower(), str(path))
    if is_torch_write_failure(e):
        try:
            full = shutil.disk_usage(path.parent).free < 64 * 2**20
        except OSError:
            full = False
        cause = os.strerror(errno.ENOSPC).lower() if full else "the write was cut short (disk full, quota or I/O error)"
        return OutputError(errno.ENOSPC if full else errno.EIO, cause, str(path))
    return None


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then move tmp_path over `path`. Returns the final path.

    The file gets the mode a plain open() would give (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_prefix(path)}{_HOST}-{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        refused = _output_error(e, path)   # before the unlink: a full disk is still full here
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if refused is not None:
            raise refused from None
        raise
    return path


def ensure_writable(folder) -> Path:
    """Create `folder` and prove a file can be written in it, or raise OutputError naming it. For writers
    that write from a thread of their own (TensorBoard's): refused there, the error would surface as a
    thread's traceback instead of one line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        refused = _output_error(e, folder)
        if refused is not None:
            raise refused from None
        raise
    return folder
