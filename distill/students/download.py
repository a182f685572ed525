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
from dataclasses import dataclass, field
from pathlib import Path

from distill.core.errors import UserError
from distill.core.progress import Progress
from distill.students.artifact import save_student, ssld_home
from distill.students.convert import PADDLE_ARCHS, _sha256, convert_pdparams
from distill.students.pdparams import PdparamsError

DEFAULT_BASE_URL = "https://paddle-imagenet-models-name.bj.bcebos.com/"
BASE_URL_ENV = "SSLD_PADDLE_BASE_URL"
CHUNK = 1 << 16
TIMEOUT_S = 30

# Where a number comes from, so the metadata can say so.
MODEL_LIST = "PaddleClas ImageNet model list (top-1 of this file)"
SSLD_LIST = "PaddleClas SSLD pretrained-model list"
LCNET_PAGE = "PaddleClas PP-LCNet page"
FT_TABLE = "SSLD recipe, ImageNet-1k finetune table"
_FT30 = "360 distillation + 30 ImageNet-1k finetune"


class DownloadError(UserError):
    pass


@dataclass(frozen=True)
class PublishedStudent:
    """One PaddleClas SSLD file. `weight_decay` is PaddleClas's L2 regularizer coefficient (coupled: added to
    the gradient, as torch SGD's weight_decay), None where no source gives it for these weights."""
    name: str                     # our artifact name
    paddle_name: str              # PaddleClas model name (what `--arch` takes)
    path: str                     # under the base URL
    top1: float                   # ImageNet-1k val top-1 (%) PaddleClas reports for this file
    weight_decay: float | None = None
    decay_source: str = "SSLD recipe tables (5M-image distillation + ImageNet-1k finetune), l2_decay column"
    loss: str | None = "JS divergence to the teacher's soft labels (SSLD)"
    epochs: int | None = None     # distillation + finetune epochs, total
    epochs_detail: str | None = None
    teacher: str | None = None
    top1_sources: dict = field(default_factory=dict)  # every figure found, by source
    notes: tuple = ()             # disagreements and caveats, in words
    preprocessing: dict = field(default_factory=dict)  # overrides of the PaddleClas eval default
    size: int | None = None       # bytes, when known
    sha256: str | None = None     # when known

    @property
    def file(self) -> str:
        return self.path.rsplit("/", 1)[-1]


_RX_TEACHER = "ResNeXt101_32x16d_wsl"   # seed 3.1: the teacher of the ResNet students
_R50_TEACHER = "ResNet50_vd_ssld"       # seed 3.1: the teacher of the MobileNet students
_NO_DECAY = "no source gives the l2 decay of these SSLD weights; consumers fall back to their default"
_HGNET_PREP = dict(crop_pct=0.965, interpolation="bicubic")  # PPHGNetV2 eval: resize 232, crop 224, bicubic
_HGNET_NOTE = ("eval preprocessing: resize 232 / crop 224 bicubic as PaddleClas's PPHGNetV2_B0 recipe and timm's "
               "port; the B4 stage-2 recipe resizes to 236")
_DML = "DML (symmetric KL) to the teacher's soft labels"

PUBLISHED = {p.name: p for p in [
    PublishedStudent(
        "r34_vd_ssld", "ResNet34_vd", "dygraph/legendary_models/ResNet34_vd_ssld_pretrained.pdparams", 79.72,
        teacher=_RX_TEACHER, top1_sources={MODEL_LIST: 79.72, SSLD_LIST: 79.70}, notes=(_NO_DECAY,)),
    PublishedStudent(
        "r50_vd_ssld", "ResNet50_vd", "dygraph/legendary_models/ResNet50_vd_ssld_pretrained.pdparams", 83.00,
        weight_decay=7e-5, epochs=420, epochs_detail="360 distillation + 60 ImageNet-1k finetune",
        teacher=_RX_TEACHER,
        top1_sources={MODEL_LIST: 83.00, FT_TABLE: 82.39,
                      "SSLD recipe, AutoAugment run (text)": 82.99},
        notes=("the published file's 83.0% matches the recipe's AutoAugment run, whose text says l2 decay was "
               "lowered from 4e-5 to 2e-5, while both recipe tables give 7e-5 for ResNet50_vd; 7e-5 is recorded "
               "as the matched decay, 2e-5 is the alternative (pass --weight-decay 2e-5 to use it)",
               "an older address, dygraph/ResNet50_vd_ssld_pretrained.pdparams, held the 82.4% weights")),
    PublishedStudent(
        "r101_vd_ssld", "ResNet101_vd", "dygraph/legendary_models/ResNet101_vd_ssld_pretrained.pdparams", 83.73,
        weight_decay=7e-5, epochs=390, epochs_detail=_FT30,
        teacher=_RX_TEACHER, top1_sources={MODEL_LIST: 83.73, FT_TABLE: 83.73}),
    PublishedStudent(
        "res2net50_vd_26w_4s_ssld", "Res2Net50_vd_26w_4s", "dygraph/Res2Net50_vd_26w_4s_ssld_pretrained.pdparams",
        83.10, teacher=_RX_TEACHER, top1_sources={MODEL_LIST: 83.10}, notes=(_NO_DECAY,)),
    PublishedStudent(
        "res2net101_vd_26w_4s_ssld", "Res2Net101_vd_26w_4s",
        "dygraph/Res2Net101_vd_26w_4s_ssld_pretrained.pdparams", 83.90, teacher=_RX_TEACHER,
        top1_sources={MODEL_LIST: 83.90}, notes=(_NO_DECAY,)),
    PublishedStudent(
        "res2net200_vd_26w_4s_ssld", "Res2Net200_vd_26w_4s",
        "dygraph/Res2Net200_vd_26w_4s_ssld_pretrained.pdparams", 85.13, weight_decay=4e-5, epochs=720,
        epochs_detail="360 distillation + 360 ImageNet-1k finetune (as the recipe table says)", teacher=_RX_TEACHER,
        top1_sources={MODEL_LIST: 85.13, FT_TABLE: 85.13, SSLD_LIST: 85.10}),
    PublishedStudent(
        "mv1_ssld", "MobileNetV1", "dygraph/legendary_models/MobileNetV1_ssld_pretrained.pdparams", 77.89,
        weight_decay=3e-5, epochs=390, epochs_detail=_FT30,
        teacher=_R50_TEACHER,
        top1_sources={MODEL_LIST: 77.89, FT_TABLE: 77.89, SSLD_LIST: 77.90}),
    PublishedStudent(
        "mv2_ssld", "MobileNetV2", "dygraph/MobileNetV2_ssld_pretrained.pdparams", 76.74,
        weight_decay=1e-5, epochs=390, epochs_detail=_FT30,
        teacher=_R50_TEACHER,
        top1_sources={MODEL_LIST: 76.74, FT_TABLE: 76.73, SSLD_LIST: 76.74}),
    PublishedStudent(
        "mv3_large_ssld", "MobileNetV3_large_x1_0",
        "dygraph/legendary_models/MobileNetV3_large_x1_0_ssld_pretrained.pdparams", 78.96,
        weight_decay=1e-5, epochs=390, epochs_detail=_FT30,
        teacher=_R50_TEACHER,
        top1_sources={MODEL_LIST: 78.96, FT_TABLE: 78.96, SSLD_LIST: 79.00}),
    PublishedStudent(
        "mv3_small_ssld", "MobileNetV3_small_x1_0",
        "dygraph/legendary_models/MobileNetV3_small_x1_0_ssld_pretrained.pdparams", 71.29,
        weight_decay=1e-5, epochs=390, epochs_detail=_FT30,
        teacher=_R50_TEACHER,
        top1_sources={MODEL_LIST: 71.29, FT_TABLE: 71.28, SSLD_LIST: 71.30},
        notes=("the model list gives 71.29%, the recipe table 71.28%",)),
    PublishedStudent(
        "mv3_small_x0_35_ssld", "MobileNetV3_small_x0_35",
        "dygraph/legendary_models/MobileNetV3_small_x0_35_ssld_pretrained.pdparams", 55.55, teacher=_R50_TEACHER,
        top1_sources={MODEL_LIST: 55.55, SSLD_LIST: 55.60}, notes=(_NO_DECAY,)),
    *[PublishedStudent(
        f"pplcnet_x{w}_ssld", f"PPLCNet_x{w}", f"dygraph/legendary_models/PPLCNet_x{w}_ssld_pretrained.pdparams",
        top1, top1_sources={SSLD_LIST: top1, **({LCNET_PAGE: top1} if w == "0_5" else {})}, loss=None,
        notes=(_NO_DECAY + " (PaddleClas's supervised PPLCNet_x1_0 recipe uses L2 3e-5)",))
      for w, top1 in (("0_25", 53.43), ("0_5", 66.10))],
    *[PublishedStudent(
        f"pplcnet_x{w}_ssld", f"PPLCNet_x{w}", f"dygraph/legendary_models/PPLCNet_x{w}_ssld_pretrained.pdparams",
        top1, weight_decay=decay, decay_source=f"PaddleClas Distillation/PPLCNet_x{w}_ssld recipe (Momentum + L2)",
        epochs=epochs, epochs_detail="ImageNet-1k distillation", teacher=_R50_TEACHER, loss=_DML,
        top1_sources={SSLD_LIST: top1, LCNET_PAGE: top1},
        notes=("decay and epochs are from the SSLD recipe PaddleClas ships for this student; its tables do not "
               "say that recipe produced this file",))
      for w, top1, decay, epochs in (("1_0", 74.39, 1e-5, 200), ("2_5", 80.82, 4e-5, 100))],
    *[PublishedStudent(
        f"hgnetv2_b{b}_ssld", f"PPHGNetV2_B{b}", f"dygraph/legendary_models/PPHGNetV2_B{b}_ssld_pretrained.pdparams",
        top1, top1_sources={"PaddleClas PP-HGNetV2 page (stage-2 weights)": top1}, preprocessing=_HGNET_PREP,
        weight_decay=2e-5 if b == 4 else None, epochs=60 if b == 4 else None,
        decay_source="PaddleClas PPHGNetV2_B4_ssld_stage2 recipe (Momentum + L2)",
        epochs_detail="stage-2 ImageNet-1k distillation finetune (PPHGNetV2_B4_ssld_stage2 recipe)" if b == 4 else None,
        teacher="PPHGNet_small_ssld" if b == 4 else None, loss="CE to the teacher's soft labels (stage 2)",
        notes=(_HGNET_NOTE,) if b == 4 else (_NO_DECAY + " (the B4 stage-2 recipe uses L2 2e-5)", _HGNET_NOTE))
      for b, top1 in ((0, 77.77), (1, 79.18), (2, 81.74), (3, 82.98), (4, 83.57), (5, 84.75), (6, 86.30))],
]}


def base_url() -> str:
    url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return url if url.endswith("/") else url + "/"


def url_for(entry: PublishedStudent) -> str:
    return base_url() + entry.path


def get_published(name: str) -> PublishedStudent:
    if name in PUBLISHED:
        return PUBLISHED[name]
    import difflib

    near = difflib.get_close_matches(name, list(PUBLISHED), n=1)
    raise DownloadError(f"no published student {name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                        + f" Downloadable: {', '.join(PUBLISHED)}")


def published_for_file(path) -> PublishedStudent | None:
    """The table row whose file name this is (a file fetched by hand converts with the same metadata)."""
    name = Path(path).name
    return next((p for p in PUBLISHED.values() if p.file == name), None)


def convertible(entry: PublishedStudent) -> bool:
    return any(entry.paddle_name in (a.name, a.paddle_name) for a in PADDLE_ARCHS.values())


def convert_command(entry: PublishedStudent) -> str:
    return f"python -m distill.convert {entry.file} --arch {entry.paddle_name}"


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
