"""Tests for instseg_core.inference.download against a loopback HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from instseg_core.inference import download
from instseg_core.inference.download import DownloadError, cache_root, fetch_official_model

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "Mask-RT-DETR-S"
MODEL_FILES = {
    "inference.json": b'{"program": "dummy"}',
    "inference.pdiparams": b"\x00\x01params" * 10,
    "inference.yml": b"Global:\n  model_name: Mask-RT-DETR-S\n",
}


def make_tar(
    files: dict[str, bytes], top: str | None = f"{NAME}_infer", extra: list[tarfile.TarInfo] | None = None
) -> bytes:
    """A tarball like the official ones: ``<top>/`` holding ``files`` (plus raw ``extra`` members)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        if top:
            d = tarfile.TarInfo(top)
            d.type = tarfile.DIRTYPE
            d.mode = 0o755
            tar.addfile(d)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buf.getvalue()


@dataclass
class ServerState:
    """What the loopback server serves; tests switch ``mode`` and read ``gets``."""

    payload: bytes = b""
    mode: str = "ok"  # ok | 404 | 500-then-ok | truncated | wrong
    fail_first: int = 1  # for 500-then-ok
    gate: threading.Event | None = None  # when set, GETs wait for it (to force overlap)
    gets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Server:
    def __init__(self, state: ServerState, port: int) -> None:
        self.state = state
        self.port = port

    def url(self, name: str = NAME) -> str:
        return f"http://127.0.0.1:{self.port}/paddle3.0.0/{name}_infer.tar"


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            with state.lock:
                state.gets += 1
                n = state.gets
            if state.gate is not None:
                state.gate.wait(15)
            mode = state.mode
            if mode == "500-then-ok" and n <= state.fail_first:
                self.send_error(500, "boom")
                return
            if mode == "404":
                self.send_error(404, "no such model")
                return
            body = b"<html>captive portal</html>" * 20 if mode == "wrong" else state.payload
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(body)))  # the full length, even if truncated
            self.end_headers()
            if mode == "truncated":
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture(autouse=True)
def _no_proxy_no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy in the environment would swallow loopback requests; backoff would slow the tests.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def server() -> Iterator[Server]:
    state = ServerState(payload=make_tar(MODEL_FILES))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(state, httpd.server_address[1])
    finally:
        if state.gate is not None:
            state.gate.set()
        httpd.shutdown()
        httpd.server_close()


def leftovers(cache: Path) -> list[str]:
    """Names under official_models/ other than finished model dirs and lock files."""
    d = cache / "official_models"
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir()
                  if not p.name.endswith(".lock") and not (p / download.MARKER_NAME).exists())


# ---------------------------------------------------------------------------------------- tests


def test_first_download_then_cache_hit(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="instseg")
    out = fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    assert out == tmp_path / "official_models" / NAME
    for name, data in MODEL_FILES.items():  # flattened: no <Name>_infer/ level
        assert (out / name).read_bytes() == data
    marker = json.loads((out / ".complete").read_text())
    assert marker["url"] == server.url()
    assert marker["size"] == len(server.state.payload)
    assert marker["sha256"] == hashlib.sha256(server.state.payload).hexdigest()
    assert server.state.gets == 1
    assert any("MB/s" in r.getMessage() for r in caplog.records)  # size and rate are logged

    server.state.mode = "404"  # a cache hit must not touch the network at all
    assert fetch_official_model(NAME, server.url(), cache_dir=tmp_path) == out
    assert server.state.gets == 1
    assert leftovers(tmp_path) == []


def test_instseg_home_honoured(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTSEG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "instseg"
    monkeypatch.setenv("INSTSEG_HOME", str(tmp_path / "ih"))
    assert cache_root() == tmp_path / "ih"
    out = fetch_official_model(NAME, server.url())
    assert out == tmp_path / "ih" / "official_models" / NAME
    assert (out / "inference.pdiparams").is_file()


def test_sha256_ok(server: Server, tmp_path: Path) -> None:
    digest = hashlib.sha256(server.state.payload).hexdigest()
    out = fetch_official_model(NAME, server.url(), cache_dir=tmp_path, sha256=digest.upper())
    assert (out / "inference.yml").is_file()
    # A cache hit with the same expected hash needs no request.
    fetch_official_model(NAME, server.url(), cache_dir=tmp_path, sha256=digest)
    assert server.state.gets == 1


def test_sha256_mismatch(server: Server, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(DownloadError) as ei:
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path, sha256=wrong)
    msg = str(ei.value)
    assert wrong in msg and hashlib.sha256(server.state.payload).hexdigest() in msg
    assert not (tmp_path / "official_models" / NAME).exists()
    assert leftovers(tmp_path) == []


def test_cached_dir_with_other_sha_is_refetched(server: Server, tmp_path: Path) -> None:
    fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    server.state.payload = make_tar({**MODEL_FILES, "inference.yml": b"Global: {}\n"})
    new = hashlib.sha256(server.state.payload).hexdigest()
    out = fetch_official_model(NAME, server.url(), cache_dir=tmp_path, sha256=new)
    assert (out / "inference.yml").read_bytes() == b"Global: {}\n"
    assert server.state.gets == 2
    assert leftovers(tmp_path) == []


def test_truncated_is_retried_then_fails(server: Server, tmp_path: Path) -> None:
    server.state.mode = "truncated"
    with pytest.raises(DownloadError, match="truncated"):
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path, retries=2)
    assert server.state.gets == 3
    assert not (tmp_path / "official_models" / NAME).exists()
    assert leftovers(tmp_path) == []


def test_500_then_success(server: Server, tmp_path: Path) -> None:
    server.state.mode, server.state.fail_first = "500-then-ok", 2
    out = fetch_official_model(NAME, server.url(), cache_dir=tmp_path, retries=3)
    assert (out / "inference.json").is_file()
    assert server.state.gets == 3


def test_500_exhausts_retries(server: Server, tmp_path: Path) -> None:
    server.state.mode, server.state.fail_first = "500-then-ok", 99
    with pytest.raises(DownloadError, match="HTTP 500"):
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path, retries=1)
    assert server.state.gets == 2
    assert leftovers(tmp_path) == []


def test_404_not_retried(server: Server, tmp_path: Path) -> None:
    server.state.mode = "404"
    with pytest.raises(DownloadError) as ei:
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path, retries=3)
    assert "not found" in str(ei.value) and server.url() in str(ei.value)
    assert server.state.gets == 1
    assert leftovers(tmp_path) == []


def test_connection_refused_gives_offline_hint(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{NAME}_infer.tar"
    with pytest.raises(DownloadError) as ei:
        fetch_official_model(NAME, url, cache_dir=tmp_path, retries=1, timeout=5)
    msg = str(ei.value)
    assert url in msg and "offline" in msg and "model_dir" in msg and "INSTSEG_HOME" in msg
    assert leftovers(tmp_path) == []


def test_not_a_tar(server: Server, tmp_path: Path) -> None:
    server.state.mode = "wrong"
    with pytest.raises(DownloadError, match="not a valid tar"):
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    assert server.state.gets == 1  # a complete but wrong body is not retried
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("drop", [("inference.pdiparams",), ("inference.yml",), ("inference.json",)])
def test_tar_missing_files(server: Server, tmp_path: Path, drop: tuple[str, ...]) -> None:
    server.state.payload = make_tar({k: v for k, v in MODEL_FILES.items() if k not in drop})
    with pytest.raises(DownloadError, match="inference"):
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    assert not (tmp_path / "official_models" / NAME).exists()
    assert leftovers(tmp_path) == []


def test_pdmodel_and_root_layout_accepted(server: Server, tmp_path: Path) -> None:
    files = {"inference.pdmodel": b"prog", "inference.pdiparams": b"p", "inference.yml": b"y: 1\n"}
    server.state.payload = make_tar(files, top=None)
    out = fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    assert sorted(p.name for p in out.iterdir() if p.name != ".complete") == sorted(files)


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 3 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("evil", [
    _member("../evil.txt"),
    _member(f"{NAME}_infer/../../evil.txt"),
    _member("/tmp/instseg-evil.txt"),
    _member(f"{NAME}_infer/link", tarfile.SYMTYPE, "/etc/passwd"),
    _member(f"{NAME}_infer/hard", tarfile.LNKTYPE, "/etc/passwd"),
    _member(f"{NAME}_infer/dev", tarfile.CHRTYPE),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_members_rejected(server: Server, tmp_path: Path, evil: tarfile.TarInfo) -> None:
    server.state.payload = make_tar(MODEL_FILES, extra=[evil])
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="unsafe archive"):
        fetch_official_model(NAME, server.url(), cache_dir=cache)
    assert not (tmp_path / "evil.txt").exists() and not (cache / "evil.txt").exists()
    assert not (cache / "official_models" / NAME).exists()
    assert leftovers(cache) == []


def test_incomplete_dir_and_stale_temps_replaced(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "official_models"
    (models / NAME).mkdir(parents=True)
    (models / NAME / "inference.pdiparams").write_bytes(b"half")  # no marker: an interrupted copy
    (models / f".{NAME}.tmp-crashed.tar.part").write_bytes(b"junk")  # left by a killed process
    out = fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    assert (out / "inference.pdiparams").read_bytes() == MODEL_FILES["inference.pdiparams"]
    assert server.state.gets == 1
    assert leftovers(tmp_path) == []


def test_invalid_model_name(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="invalid model name"):
        fetch_official_model("../x", "http://127.0.0.1:1/x.tar", cache_dir=tmp_path)


_WORKER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from instseg_core.inference.download import fetch_official_model
print("ready", flush=True)
print(fetch_official_model(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3]), flush=True)
"""


def test_concurrent_processes_download_once(server: Server, tmp_path: Path) -> None:
    server.state.gate = threading.Event()  # hold the first GET until every process is waiting
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, NAME, server.url(), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # all three are now in fetch_official_model: one in GET, two on the lock
        assert server.state.gets == 1
        server.state.gate.set()
        results = [p.communicate(timeout=20) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    assert {out.strip() for out, _ in results} == {str(tmp_path / "official_models" / NAME)}
    assert server.state.gets == 1
    assert sum("another process" in err for _, err in results) == 2  # two really waited
    assert leftovers(tmp_path) == []


def test_concurrent_threads_download_once(server: Server, tmp_path: Path) -> None:
    # flock is per open file, so threads of one process (e.g. a thread-pool loader) also serialise.
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(results) == 4 and len(set(results)) == 1
    assert server.state.gets == 1


def test_first_download_is_pinned_and_a_changed_file_refused(server: Server, tmp_path: Path) -> None:
    """Trust on first use: the first tarball's sha256 is recorded; a later download of the same URL
    (cache cleared) with other bytes is refused, with both hashes and the pins file named."""
    out = fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    first = hashlib.sha256(server.state.payload).hexdigest()
    pins = json.loads((tmp_path / download.PINS_FILE).read_text())
    assert pins == {server.url(): first}
    shutil.rmtree(out)
    server.state.payload = make_tar({**MODEL_FILES, "inference.yml": b"Global: {model_name: evil}\n"})
    with pytest.raises(DownloadError, match=f"changed: .*{first}") as ei:
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    assert download.PINS_FILE in str(ei.value)
    assert not out.exists() and leftovers(tmp_path) == []
    # the same bytes as the first time download again
    server.state.payload = make_tar(MODEL_FILES)
    assert (fetch_official_model(NAME, server.url(), cache_dir=tmp_path) / "inference.yml").is_file()


def test_download_and_extraction_sizes_are_capped(server: Server, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    payload = len(server.state.payload)
    monkeypatch.setattr(download, "MAX_DOWNLOAD_BYTES", payload - 1)
    with pytest.raises(DownloadError, match="more than the .* MB an inference model can be"):
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    monkeypatch.setattr(download, "MAX_DOWNLOAD_BYTES", 1 << 30)
    # a small archive whose members unpack to more than the cap (sizes from the tar headers)
    monkeypatch.setattr(download, "MAX_EXTRACT_BYTES", sum(len(v) for v in MODEL_FILES.values()) - 1)
    with pytest.raises(DownloadError, match="would unpack to"):
        fetch_official_model(NAME, server.url(), cache_dir=tmp_path)
    assert not (tmp_path / "official_models" / NAME).exists() and leftovers(tmp_path) == []
