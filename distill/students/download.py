"""From a student name to installed weights: PaddleClas's published SSLD files, fetched, checked, converted.

    python -m distill.convert --download r50_vd_ssld      # into $SSLD_HOME/r50_vd_ssld.safetensors

The table below is data: each row is one published .pdparams file with the recipe facts known for those
exact weights. Network use is opt-in (only this command fetches); a partial download is kept as `.part`
and resumed with an HTTP Range request. `SSLD_PADDLE_BASE_URL` points the downloader at a mirror.
"""
from __future__ import annotations

import http.client
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from distill.core.progress import Progress
from distill.students.artifact import save_student, ssld_home
from distill.students.convert import PADDLE_ARCHS, _sha256, convert_pdparams
from distill.students.pdparams import PdparamsError
from distill.students.published import (BASE_URL_ENV, DEFAULT_BASE_URL, PUBLISHED, DownloadError, PublishedStudent,  # noqa: F401
                                        convert_command, get_published, url_for)

CHUNK = 1 << 16
TIMEOUT_S = 30

def convertible(entry: PublishedStudent) -> bool:
    return any(entry.paddle_name in (a.name, a.paddle_name) for a in PADDLE_ARCHS.values())


def _offline_hint(entry: PublishedStudent, url: str) -> str:
    return f"fetch {url} by hand, then run: {convert_command(entry)}"


def _total_size(response, offset: int) -> int | None:
    """Full file size from Content-Range (`bytes a-b/TOTAL`) or Content-Length (+ the resumed offset)."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) + offset if length is not None else None


def fetch(url: str, dest, expected_size: int | None = None, sha256: str | None = None,
          progress: bool = True, hint: str = "") -> Path:
    """Download `url` to `dest`, resuming `dest.part`; check the size (and sha256 when known) before the rename."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    hint = f"; {hint}" if hint else ""
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset and expected_size in (None, offset):  # the .part is already whole
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url} ({reason}){hint}") from None
    if response is not None:
        with response:
            if offset and response.status != 206:  # the server ignored the Range: start over
                offset = 0
            total = _total_size(response, offset)
            if expected_size is not None and total is not None and total != expected_size:
                raise DownloadError(f"{url} is {total} bytes, expected {expected_size}: not the published file{hint}")
            with part.open("ab" if offset else "wb") as f, \
                    Progress(total, f"download {dest.name}", unit="B", enabled=progress, initial=offset) as bar:
                try:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:  # IncompleteRead: the server closed early
                    raise DownloadError(f"download of {url} broke off ({type(e).__name__}); rerun the same command "
                                        f"to resume from {part}{hint}") from None
        got = part.stat().st_size
        if total is not None and got != total:
            raise DownloadError(f"download of {url} stopped at {got} of {total} bytes; rerun the same command "
                                f"to resume from {part}{hint}")
        expected_size = expected_size or total
    got = part.stat().st_size
    if expected_size is not None and got != expected_size:
        raise DownloadError(f"{part} holds {got} bytes, expected {expected_size}; delete it and rerun{hint}")
    if sha256 and _sha256(part) != sha256:
        part.unlink()
        raise DownloadError(f"{url}: sha256 mismatch (expected {sha256}); the partial file was removed, rerun{hint}")
    os.replace(part, dest)
    return dest


def published_pretrain(entry: PublishedStudent, url: str | None = None) -> dict:
    """The `pretrain` section a converted published file carries (decay, epochs, top-1, where each came from)."""
    return dict(
        source="PaddleClas", paddle_arch=entry.paddle_name, url=url or (DEFAULT_BASE_URL + entry.path),
        optimizer="momentum", weight_decay=entry.weight_decay,
        weight_decay_kind="coupled" if entry.weight_decay is not None else None,
        weight_decay_source=entry.decay_source if entry.weight_decay is not None else None,
        epochs=entry.epochs, epochs_detail=entry.epochs_detail,
        teacher=entry.teacher, loss=entry.loss, top1=entry.top1,
        top1_sources=dict(entry.top1_sources), notes=list(entry.notes))


def convert_published(pdparams, entry: PublishedStudent, url: str | None = None):
    """convert_pdparams + the table's metadata for this file."""
    model, meta = convert_pdparams(pdparams, entry.paddle_name)
    meta["name"] = entry.name
    meta["pretrain"] = {**meta["pretrain"], **published_pretrain(entry, url)}
    meta["preprocessing"] = {**meta["preprocessing"], **entry.preprocessing}
    return model, meta


def download_student(name: str, home=None, progress: bool = True, force: bool = False) -> Path:
    """Fetch (into HOME/downloads, resumable), verify, convert and install `name` as HOME/NAME.safetensors."""
    entry = get_published(name)
    home = Path(home) if home is not None else ssld_home()
    target = home / f"{entry.name}.safetensors"
    if target.is_file() and not force:
        return target
    if not convertible(entry):
        raise DownloadError(f"{entry.name}: PaddleClas publishes {entry.file}, but its architecture "
                            f"{entry.paddle_name} has no converter yet (python -m distill.convert --help lists them)")
    url = url_for(entry)
    pdparams = home / "downloads" / entry.file
    if not pdparams.is_file() or force:
        fetch(url, pdparams, entry.size, entry.sha256, progress=progress, hint=_offline_hint(entry, url))
    try:  # unpickles through the restricted reader, then checks every tensor against the architecture
        model, meta = convert_published(pdparams, entry, url)
    except PdparamsError as e:
        pdparams.unlink(missing_ok=True)  # truncated or not a state dict: a rerun must fetch it again
        raise DownloadError(f"{url} arrived but is not a readable PaddleClas file, so it was removed ({e}); "
                            f"rerun, or {_offline_hint(entry, url)}") from None
    save_student(target, model, meta)
    pdparams.unlink()  # the artifact holds every tensor and records the file's url and sha256
    return target


def student_status(home=None) -> list[dict]:
    """One row per published student: installed (path) or downloadable (url), and whether it converts yet."""
    home = Path(home) if home is not None else ssld_home()
    rows = []
    for entry in PUBLISHED.values():
        path = home / f"{entry.name}.safetensors"
        installed = path.is_file()
        ok = convertible(entry)
        rows.append(dict(name=entry.name, paddle_arch=entry.paddle_name, top1=entry.top1,
                         weight_decay=entry.weight_decay, installed=installed, convertible=ok,
                         status="installed" if installed else ("downloadable" if ok else "no converter yet"),
                         path=str(path) if installed else None, url=url_for(entry)))
    return rows


def status_lines(home=None) -> list[str]:
    """The published students as `python -m distill.zoo` prints them: installed, or how to download."""
    rows = student_status(home)
    width = max(len(r["name"]) for r in rows)
    lines = ["Published SSLD students (python -m distill.convert --download NAME):"]
    for r in rows:
        where = r["path"] if r["installed"] else r["url"]
        lines.append(f"  {r['name']:<{width}}  {r['status']:<16}  top-1 {r['top1']:5.2f}%  {where}")
    return lines
