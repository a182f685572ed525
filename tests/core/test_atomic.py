"""Atomic writes: refused writes read as one line naming the target, killed writers' temporaries are
cleaned up, and written files honour the umask."""
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from distill.core import atomic
from distill.core.atomic import atomic_write, remove_stale_temporaries
from distill.core.checkpoint import save_checkpoint
from distill.core.errors import INTACT, UserError, run_cli


def _fail_with(code):
    def write(tmp):
        raise OSError(code, os.strerror(code), tmp)
    return write


@pytest.mark.parametrize("code, cause", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system"),
                                          (errno.ENOSPC, "no space left on device"),
                                          (errno.EDQUOT, "disk quota exceeded")])
def test_refused_write_is_one_line_naming_the_target_and_cause(tmp_path, capsys, code, cause):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda argv: atomic_write(target, _fail_with(code)))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write {target}: {cause}")
    assert "intact" in err and ".tmp" not in err
    assert target.read_bytes() == b"previous"                      # nothing earlier lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]   # no temporary left


def test_real_short_torch_write_is_reported_as_a_full_disk(tmp_path, monkeypatch, capsys):
    """torch.save onto /dev/full (always ENOSPC) raises torch's own 'unexpected pos' error, with no errno."""
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("no /dev/full device")   # never create a regular file in its place
    target = tmp_path / "checkpoint.pt"
    state = {"w": torch.zeros(100_000)}
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))  # a full disk
    with pytest.raises(SystemExit):
        run_cli(lambda argv: atomic_write(target, lambda tmp: torch.save(state, "/dev/full")))
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: cannot write {target}: no space left on device"), err
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_folder_as_root_too(tmp_path, capsys):
    """chmod does not stop root (CI runs as root), but sysfs refuses to create anything, even for root."""
    target = "/sys/ssld-kit-test/out/checkpoint.pt"
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda argv: save_checkpoint(target, {"x": torch.ones(1)}))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: cannot write /sys/ssld-kit-test") and \
        any(c in err for c in ("permission denied", "operation not permitted", "read-only file system")), err


def test_an_oserror_outside_atomic_write_is_one_line_too(tmp_path, capsys):
    def main(argv):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "tb"))
    with pytest.raises(SystemExit):
        run_cli(main)
    assert capsys.readouterr().err == f"error: cannot write {tmp_path / 'tb'}: permission denied ({INTACT})\n"


def test_other_errors_still_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_cli(lambda argv: open(tmp_path / "missing" / "x"))
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda argv: 1 / 0)
    with pytest.raises(SystemExit):
        run_cli(lambda argv: (_ for _ in ()).throw(UserError("bad")))


def test_written_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        path = atomic_write(tmp_path / "b.txt", lambda tmp: open(tmp, "w").write("x"))
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


KILLED_WRITER = """
import sys, time
from distill.core.atomic import atomic_write
def write(tmp):
    open(tmp, "w").write("partial")
    print("writing", flush=True)
    time.sleep(60)
atomic_write(sys.argv[1], write)
"""


def test_temporary_of_a_killed_writer_is_removed_on_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    temps = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(temps) == 1
    assert remove_stale_temporaries(target) == []          # its writer is alive: kept
    assert temps[0].exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other = tmp_path / ".other.pt.x-1.abc.tmp"              # another target's temporary: never touched
    other.write_text("x")
    save_checkpoint(target, {"x": torch.ones(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.x-1.abc.tmp", "checkpoint.pt"]


def test_old_style_and_long_abandoned_temporaries_are_stale(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    old_style = tmp_path / ".state.pt.k2j3h4.tmp"          # no writer in the name (previous versions)
    old_style.write_text("x")
    os.utime(old_style, (atomic._PROCESS_START - 10,) * 2)
    young_old_style = tmp_path / ".state.pt.zz9.tmp"       # written after this process started: kept
    young_old_style.write_text("x")
    foreign = tmp_path / ".state.pt.otherhost-1.abc.tmp"   # another node's live writer: kept while fresh
    foreign.write_text("x")
    abandoned = tmp_path / ".state.pt.otherhost-2.abc.tmp"
    abandoned.write_text("x")
    os.utime(abandoned, (time.time() - atomic.STALE_SECONDS - 1,) * 2)
    removed = remove_stale_temporaries(target)
    assert sorted(p.name for p in removed) == sorted([old_style.name, abandoned.name])
    assert young_old_style.exists() and foreign.exists()


def test_safetensors_full_disk_names_the_errno_it_hides_in_its_message(tmp_path, capsys):
    """safetensors raises SafetensorError('... No space left on device (os error 28)'), not an OSError."""
    from safetensors import SafetensorError
    target = tmp_path / "student.safetensors"

    def write(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(SystemExit):
        run_cli(lambda argv: atomic_write(target, write))
    assert capsys.readouterr().err.startswith(f"error: cannot write {target}: no space left on device (")
    with pytest.raises(SystemExit):   # the same error raised outside atomic_write: no path to name
        run_cli(lambda argv: write(None))
    assert capsys.readouterr().err.startswith("error: cannot write the output: no space left on device (")


def test_a_run_folder_is_swept_of_dead_writers_temporaries_at_start(tmp_path):
    """A killed write of a target that is never written again (model_final.pt) still goes."""
    from distill.core.atomic import _HOST, remove_stale_temporaries_in
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model_final.pt.{_HOST}-{dead.pid}.x1y2z3a4.tmp"
    live = tmp_path / f".checkpoint.pt.{_HOST}-{os.getpid()}.q1w2e3r4.tmp"   # this process: a write in flight
    unrelated = tmp_path / ".hidden.tmp"                                   # not ours, but young: kept
    for p in (stale, live, unrelated):
        p.write_text("x")
    os.utime(unrelated, None)
    assert remove_stale_temporaries_in(tmp_path) == [stale]
    assert live.exists() and unrelated.exists()
