"""--download without the internet: a 127.0.0.1 server serves a real paddle.save'd PaddleClas file."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from distill.students import download
from distill.students.artifact import ArtifactError, load_student, resolve_student
from distill.convert import main as convert_main
from distill.students.download import DownloadError, PUBLISHED, download_student, student_status

if os.environ.get("CI"):
    import paddle  # CI installs the test extra: a missing paddle must fail, not skip
else:
    paddle = pytest.importorskip("paddle", reason="needs the test extra (paddlepaddle, paddleclas)")

NAME = "pplcnet_x0_25_ssld"  # the smallest published student (1.5M parameters)
ENTRY = PUBLISHED[NAME]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(file bytes, input, PaddleClas logits) of a real PPLCNet_x0_25 with random weights and BN statistics."""
    from paddleclas.ppcls.arch.backbone.legendary_models import pp_lcnet

    paddle.set_device("cpu")
    paddle.seed(0)
    layer = pp_lcnet.PPLCNet_x0_25()
    rng = np.random.default_rng(0)
    layer.set_state_dict({k: paddle.to_tensor(
        rng.uniform(0.5, 2.0, v.shape).astype(np.float32) if k.endswith("_variance")
        else rng.normal(0, 0.1, v.shape).astype(np.float32)) for k, v in layer.state_dict().items()})
    layer.eval()
    path = tmp_path_factory.mktemp("paddle") / ENTRY.file
    paddle.save(layer.state_dict(), str(path))
    x = rng.normal(size=(1, 3, 64, 64)).astype(np.float32)
    with paddle.no_grad():
        logits = layer(paddle.to_tensor(x)).numpy()
    return path.read_bytes(), x, logits


class Server:
    """Serves `files` (URL path -> bytes) with HTTP Range support; `cut_after` bytes ends a reply early once."""

    def __init__(self, files):
        self.files, self.cut_after, self.requests = files, None, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_after is not None:
                    body, server.cut_after = body[:server.cut_after], None
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(published, monkeypatch):
    srv = Server({"/" + ENTRY.path: published[0]})
    monkeypatch.setenv(download.BASE_URL_ENV, srv.url)
    yield srv
    srv.close()


def test_download_installs_a_student_that_resolves_by_name_and_gives_paddle_logits(server, published, ssld_home,
                                                                                   capsys):
    data, x, expected = published
    convert_main(["--download", NAME, "--no-progress"])
    assert f"--backbone {NAME}" in capsys.readouterr().out
    assert resolve_student(NAME) == ssld_home / f"{NAME}.safetensors"
    model, meta = load_student(NAME)
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4
    pre = meta["pretrain"]
    assert meta["name"] == NAME and pre["paddle_arch"] == "PPLCNet_x0_25" and pre["top1"] == 53.43
    assert pre["url"] == server.url + ENTRY.path and pre["sha256"] == hashlib.sha256(data).hexdigest()
    assert pre["weight_decay"] is None and "l2 decay" in pre["notes"][0]  # no source gives it: said so
    assert not list((ssld_home / "downloads").iterdir())  # no .part, and the .pdparams went once converted
    rows = {r["name"]: r for r in student_status()}
    assert rows[NAME]["status"] == "installed" and rows["r50_vd_ssld"]["status"] == "downloadable"
    before = len(server.requests)
    download_student(NAME)  # installed: nothing fetched again
    assert len(server.requests) == before


def test_a_broken_off_download_resumes_from_the_partial_file(server, published, ssld_home):
    data = published[0]
    server.cut_after = len(data) // 3
    with pytest.raises(DownloadError, match=rf"stopped at {len(data) // 3} of {len(data)} bytes|broke off") as e:
        download_student(NAME, progress=False)
    assert "rerun the same command to resume" in str(e.value)
    part = ssld_home / "downloads" / (ENTRY.file + ".part")
    assert part.stat().st_size == len(data) // 3
    assert not (ssld_home / f"{NAME}.safetensors").exists()
    download_student(NAME, progress=False)
    assert server.requests[-1] == ("/" + ENTRY.path, f"bytes={len(data) // 3}-")  # asked only for the rest
    assert not part.exists()
    assert load_student(NAME)[1]["pretrain"]["sha256"] == hashlib.sha256(data).hexdigest()  # the whole file


def test_a_truncated_file_is_refused_removed_and_not_installed(server, published, ssld_home):
    server.files["/" + ENTRY.path] = published[0][: len(published[0]) // 2]  # whole reply, half a pickle
    with pytest.raises(DownloadError, match="not a readable PaddleClas file, so it was removed") as e:
        download_student(NAME, progress=False)
    assert ENTRY.file in str(e.value) and "--arch PPLCNet_x0_25" in str(e.value)
    assert not (ssld_home / "downloads" / ENTRY.file).exists()
    assert not (ssld_home / f"{NAME}.safetensors").exists()


def test_missing_file_and_unknown_name_are_one_line_errors(server, ssld_home):
    server.files.clear()
    with pytest.raises(DownloadError, match=r"HTTP 404"):
        download_student(NAME, progress=False)
    with pytest.raises(DownloadError, match=r"did you mean 'r50_vd_ssld'"):
        download_student("r50_vd_sld")


def test_offline_error_names_the_address_and_the_convert_command_which_then_installs(published, ssld_home,
                                                                                     tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, **{download.BASE_URL_ENV: f"http://127.0.0.1:{port}/", "SSLD_HOME": str(ssld_home)})
    r = subprocess.run([sys.executable, "-m", "distill.convert", "--download", NAME], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and f"http://127.0.0.1:{port}/{ENTRY.path}" in line
    assert f"python -m distill.convert {ENTRY.file} --arch PPLCNet_x0_25" in line
    # fetched by hand under its published name: the same artifact, installed under the same name
    by_hand = tmp_path / ENTRY.file
    by_hand.write_bytes(published[0])
    convert_main([str(by_hand), "--arch", "PPLCNet_x0_25"])
    meta = load_student(NAME)[1]
    assert meta["name"] == NAME and meta["pretrain"]["top1"] == 53.43


def test_convert_installs_into_ssld_home_unless_o_says_elsewhere(published, ssld_home, tmp_path):
    weights = tmp_path / "mine.pdparams"
    weights.write_bytes(published[0])
    convert_main([str(weights), "--arch", "pplcnet_x0_25"])
    assert resolve_student("mine") == ssld_home / "mine.safetensors"
    assert load_student("mine")[1]["pretrain"]["top1"] is None  # not a published file: no borrowed metadata
    convert_main([str(weights), "--arch", "PPLCNet_x0_25", "-o", str(tmp_path / "here" / "x.safetensors")])
    assert (tmp_path / "here" / "x.safetensors").is_file()
    with pytest.raises(ArtifactError, match="--download NAME"):
        resolve_student("not_there")
