"""Download official inference models into a local cache, safely.

``fetch_official_model(name, url)`` returns ``<cache>/official_models/<name>/`` holding the flattened
contents of the ``<name>_infer.tar`` tarball (``inference.json``/``inference.pdmodel``,
``inference.pdiparams``, ``inference.yml``). The cache is ``$INSTSEG_HOME`` or ``~/.cache/instseg``.

Guarantees:

* A complete dir (it carries a ``.complete`` marker, written last) is returned with no network access.
* Nothing half-written ever appears under the final name: the tarball is streamed to a temp file in
  the cache dir, checked (HTTP status, Content-Length, optional sha256, tar contents), extracted into
  a temp dir, and only then renamed into place. Temps are removed on failure.
* Concurrent callers on one host (processes or threads) download once: an ``fcntl.flock`` on
  ``<name>.lock`` serialises them, and whoever gets the lock second finds the complete dir.
* Connection errors, timeouts, truncated bodies and 5xx/429 are retried with exponential backoff;
  404 and other 4xx are not. Every failure is a :class:`DownloadError` saying what to do.

Only the standard library is used (``urllib.request``), so this works without optional extras.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from instseg_core.io import atomic_write, cache_root, file_lock, remove_temps, replace_dir, temp_prefix

__all__ = ["DownloadError", "cache_root", "download_file", "fetch_official_model", "is_complete", "MARKER_NAME"]

logger = logging.getLogger("instseg")

MARKER_NAME = ".complete"
PARAMS_FILE = "inference.pdiparams"
CONFIG_FILE = "inference.yml"
GRAPH_FILES = ("inference.json", "inference.pdmodel")  # PIR json (Paddle 3) or legacy ProgramDesc

CHUNK_SIZE = 1 << 20  # 1 MiB: tarballs reach ~450 MB, so never hold one in memory
# Caps far above the largest official model (Mask-RT-DETR-H, ~450 MB) so a wrong URL, a hostile
# server or a decompression bomb cannot fill the disk. Module-level so tests can lower them.
MAX_DOWNLOAD_BYTES = 4 << 30
MAX_EXTRACT_BYTES = 4 << 30
# url -> sha256 of the first download (trust on first use): a later download of the same URL
# (cache cleared, other machine sharing INSTSEG_HOME) must match it
PINS_FILE = "official_sha256.json"
PROGRESS_EVERY_S = 5.0
# First retry waits RETRY_BACKOFF_S, then doubles up to RETRY_BACKOFF_MAX_S. Module-level so tests
# can set it to 0.
RETRY_BACKOFF_S = 1.0
RETRY_BACKOFF_MAX_S = 30.0

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_USER_AGENT = "instseg-model-download/1"


class DownloadError(RuntimeError):
    """A model could not be downloaded or its archive is unusable; the message says what to do."""


def is_complete(model_dir: Path, sha256: str | None = None) -> bool:
    """Whether ``model_dir`` is a finished download (marker present, required files present).

    With ``sha256`` the marker must also record that tarball hash, so a changed expectation
    triggers a fresh download instead of silently serving other weights.
    """
    marker = model_dir / MARKER_NAME
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict):
        return False
    if sha256 is not None and str(info.get("sha256", "")).lower() != sha256.lower():
        return False
    return _missing_files({p.name for p in model_dir.iterdir() if p.is_file()}) == []


def fetch_official_model(
    model_name: str,
    url: str,
    *,
    cache_dir: Path | None = None,
    sha256: str | None = None,
    timeout: float = 60,
    retries: int = 3,
) -> Path:
    """Return the local dir of official model ``model_name``, downloading ``url`` if needed.

    Args:
        model_name: Official model name (e.g. ``"Mask-RT-DETR-L"``); becomes a directory name.
        url: Tarball URL, normally ``models.get_spec(name).inference_url``.
        cache_dir: Cache root; defaults to :func:`cache_root`.
        sha256: Expected hex sha256 of the tarball; checked when given.
        timeout: Socket timeout in seconds for connect and each read.
        retries: Extra attempts after the first on transient failures (so ``retries + 1`` in all).

    Returns:
        ``<cache_dir>/official_models/<model_name>/`` with the inference files directly in it.

    Raises:
        DownloadError: on any failure (not found, offline, truncated, hash mismatch, bad archive,
            disk error). No partial files are left behind.
    """
    if not _SAFE_NAME.match(model_name):
        raise DownloadError(f"invalid model name {model_name!r}: it is used as a directory name")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    models_dir = root / "official_models"
    target = models_dir / model_name
    if is_complete(target, sha256):
        logger.debug("model %s: cache hit at %s", model_name, target)
        return target
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"cannot create model cache dir {models_dir}: {e}; set INSTSEG_HOME to a writable "
            f"directory or pass model_dir=... to use a local model"
        ) from e

    lock = models_dir / f"{model_name}.lock"
    with file_lock(lock, f"model {model_name}: another process is downloading it, waiting ({lock})"):
        # Another process may have finished while we waited for the lock.
        if is_complete(target, sha256):
            logger.info("model %s: completed by another process, using %s", model_name, target)
            return target
        tmp_prefix = temp_prefix(target)
        remove_temps(models_dir, tmp_prefix)  # crashed earlier runs; safe: we hold the lock
        fd, tmp_name = tempfile.mkstemp(prefix=tmp_prefix, suffix=".tar.part", dir=models_dir)
        os.close(fd)
        tmp_tar = Path(tmp_name)
        tmp_dir: Path | None = None
        try:
            size, digest = download_file(url, tmp_tar, timeout=timeout, retries=retries)
            pinned = _pinned_sha256(root, url)
            if sha256 is None and pinned is not None and digest != pinned:
                raise DownloadError(
                    f"sha256 of {url} changed: {digest}, but the first download (recorded in "
                    f"{root / PINS_FILE}) was {pinned}; the download was discarded. If the new file is "
                    f"trusted, remove that entry")
            if sha256 is not None and digest.lower() != sha256.lower():
                raise DownloadError(
                    f"sha256 mismatch for {url}: expected {sha256.lower()}, got {digest}; the "
                    f"download was discarded. The file on the server changed or was corrupted in "
                    f"transit; retry, or update the expected hash if the new file is trusted"
                )
            tmp_dir = Path(tempfile.mkdtemp(prefix=tmp_prefix, suffix=".extract", dir=models_dir))
            files = _extract_model(tmp_tar, tmp_dir, url)
            _write_marker(tmp_dir, {"model_name": model_name, "url": url, "size": size,
                                    "sha256": digest, "files": files})
            replace_dir(tmp_dir, target)
            tmp_dir = None
            if pinned is None:
                _pin_sha256(root, url, digest)
        except OSError as e:  # local disk trouble (ENOSPC, permissions); network errors are wrapped earlier
            raise DownloadError(
                f"writing model {model_name} into {models_dir} failed: {e}; check free space and "
                f"permissions, or set INSTSEG_HOME to another cache directory"
            ) from e
        finally:
            tmp_tar.unlink(missing_ok=True)
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("model %s: ready at %s", model_name, target)
    return target


# ------------------------------------------------------------------------------------ download


class _Retryable(Exception):
    """A transient failure worth another attempt; ``str()`` is the cause."""


def download_file(url: str, dest: Path, *, timeout: float = 60, retries: int = 3) -> tuple[int, str]:
    """Stream ``url`` into the local file ``dest`` (truncated first); return (size in bytes, hex sha256).

    Connection errors, timeouts, truncated bodies and 5xx/429 are retried ``retries`` times with
    exponential backoff; a file over ``MAX_DOWNLOAD_BYTES`` is refused. Any failure is a
    :class:`DownloadError` saying what to do.
    """
    attempts = max(0, retries) + 1
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            return _download_once(url, dest, timeout=timeout)
        except _Retryable as e:
            last = str(e)
            if attempt == attempts:
                break
            delay = min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S)
            logger.warning("download of %s failed (attempt %d/%d): %s; retrying in %.1f s",
                           url, attempt, attempts, last, delay)
            time.sleep(delay)
    if last.startswith("connection failed"):
        raise DownloadError(
            f"cannot download {url} after {attempts} attempts: {last}. Are you offline or behind a "
            f"proxy? Pass model_dir=... with a local copy of the model, or set INSTSEG_HOME to a "
            f"cache that already has it (<INSTSEG_HOME>/official_models/<name>/)"
        )
    raise DownloadError(
        f"cannot download {url} after {attempts} attempts: {last}. Retry later, or pass "
        f"model_dir=... with a local copy of the model"
    )


def _download_once(url: str, dest: Path, *, timeout: float) -> tuple[int, str]:
    """One GET into ``dest`` (truncated first). Raises _Retryable or DownloadError."""
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            raise DownloadError(
                f"model not found: {url} returned HTTP 404; check the model name, or pass "
                f"model_dir=... with a local copy"
            ) from None
        if e.code in _RETRY_STATUS or e.code >= 500:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"download of {url} refused: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _Retryable(f"connection failed ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, TLS errors
        raise _Retryable(f"connection failed ({type(e).__name__}: {e})") from None
    with resp:
        if resp.status != 200:  # urllib follows redirects; any other 2xx is not our file
            raise DownloadError(f"download of {url} failed: unexpected HTTP {resp.status}")
        expected = _content_length(resp)
        return _stream(resp, dest, url, expected)


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream(resp: BinaryIO, dest: Path, url: str, expected: int | None) -> tuple[int, str]:
    """Copy the body to ``dest`` in chunks, hashing and logging progress; check the length."""
    if expected is not None and expected > MAX_DOWNLOAD_BYTES:
        raise DownloadError(f"{url} is {expected / 1e6:.0f} MB, more than the {MAX_DOWNLOAD_BYTES / 1e6:.0f} MB "
                            f"an inference model can be; not downloading it")
    total = f"{expected / 1e6:.1f} MB" if expected is not None else "unknown size"
    logger.info("downloading %s (%s)", url, total)
    sha = hashlib.sha256()
    received = 0
    start = last_log = time.monotonic()
    with open(dest, "wb") as out:
        while True:
            try:
                chunk = resp.read(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as e:  # any read error is the network's
                raise _Retryable(f"connection lost after {received} bytes "
                                 f"({type(e).__name__}: {e})") from None
            if not chunk:
                break
            out.write(chunk)  # OSError here is a local disk problem, reported by the caller
            sha.update(chunk)
            received += len(chunk)
            if received > MAX_DOWNLOAD_BYTES:
                raise DownloadError(f"{url} sent more than {MAX_DOWNLOAD_BYTES / 1e6:.0f} MB, more than an "
                                    f"inference model can be; the download was discarded")
            now = time.monotonic()
            if now - last_log >= PROGRESS_EVERY_S:
                last_log = now
                pct = f" ({100 * received / expected:.0f}%)" if expected else ""
                logger.info("  %.1f MB%s at %.1f MB/s", received / 1e6, pct,
                            received / 1e6 / max(now - start, 1e-9))
        out.flush()
        os.fsync(out.fileno())
    # http.client returns b"" at EOF even if fewer than Content-Length bytes came, so check here.
    if expected is not None and received != expected:
        raise _Retryable(f"truncated download: got {received} of {expected} bytes")
    elapsed = max(time.monotonic() - start, 1e-9)
    logger.info("downloaded %.1f MB in %.1f s (%.1f MB/s)", received / 1e6, elapsed,
                received / 1e6 / elapsed)
    return received, sha.hexdigest()


# ------------------------------------------------------------------------------------- extract


def _missing_files(names: set[str]) -> list[str]:
    """Required inference files absent from ``names`` (a graph file counts as either format)."""
    missing = [f for f in (PARAMS_FILE, CONFIG_FILE) if f not in names]
    if not any(g in names for g in GRAPH_FILES):
        missing.append(" or ".join(GRAPH_FILES))
    return missing


def _member_parts(member: tarfile.TarInfo, url: str) -> tuple[str, ...]:
    """Validated relative path parts of a member; rejects anything that could escape the dir."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DownloadError(f"unsafe archive {url}: absolute path member {member.name!r}")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise DownloadError(f"unsafe archive {url}: path traversal member {member.name!r}")
    if not (member.isreg() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise DownloadError(f"unsafe archive {url}: {kind} member {member.name!r} is not allowed")
    return parts


def _extract_model(tar_path: Path, dest: Path, url: str) -> list[str]:
    """Validate the tarball and extract the model files, flattened, into ``dest``.

    The official layout is ``<Name>_infer/<files>``; files at the archive root are accepted too.
    The model dir is the one holding ``inference.pdiparams``; its contents (minus that prefix) are
    extracted. Returns the sorted top-level file names.
    """
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DownloadError(
            f"{url} is not a valid tar archive ({e}); the server may have returned an error page "
            f"(proxy/captive portal?) or the file is corrupt"
        ) from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError) as e:
            raise DownloadError(f"{url} is a corrupt tar archive ({e})") from None
        parsed = [(m, _member_parts(m, url)) for m in members]  # validate all before any write
        bases = {parts[:-1] for m, parts in parsed
                 if m.isreg() and parts and parts[-1] == PARAMS_FILE and len(parts) <= 2}
        if len(bases) != 1:
            names = sorted({parts[-1] for m, parts in parsed if m.isreg() and parts})
            raise DownloadError(
                f"{url} is not an inference model archive: expected one dir with {PARAMS_FILE}, "
                f"{CONFIG_FILE} and {' or '.join(GRAPH_FILES)}; found files {names}"
            )
        base = bases.pop()
        selected: list[tarfile.TarInfo] = []
        top_files: set[str] = set()
        for m, parts in parsed:
            if parts[: len(base)] != base or len(parts) == len(base):
                continue  # outside the model dir, or the model dir entry itself
            rel = parts[len(base):]
            if m.isreg() and len(rel) == 1:
                top_files.add(rel[0])
            stripped = copy.copy(m)
            stripped.name = "/".join(rel)
            selected.append(stripped)
        missing = _missing_files(top_files)
        if missing:
            raise DownloadError(f"{url} is incomplete: missing {', '.join(missing)} in the archive")
        unpacked = sum(m.size for m in selected if m.isreg())
        if unpacked > MAX_EXTRACT_BYTES:  # sizes from the headers, checked before writing a byte
            raise DownloadError(f"{url} would unpack to {unpacked / 1e6:.0f} MB, more than "
                                f"{MAX_EXTRACT_BYTES / 1e6:.0f} MB; not extracting it")
        try:
            if hasattr(tarfile, "data_filter"):  # 3.12 / 3.11.4+: second line of defence
                tar.extractall(dest, members=selected, filter="data")
            else:  # pragma: no cover - members were validated above
                tar.extractall(dest, members=selected)
        except (tarfile.TarError, EOFError) as e:
            raise DownloadError(f"{url}: extraction failed ({e})") from None
    return sorted(top_files)


def _pinned_sha256(root: Path, url: str) -> str | None:
    try:
        pins = json.loads((root / PINS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = pins.get(url) if isinstance(pins, dict) else None
    return str(value).lower() if value else None


def _pin_sha256(root: Path, url: str, digest: str) -> None:
    """Record the first download's hash (called under the model's lock; other models' entries kept)."""
    path = root / PINS_FILE
    try:
        pins = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pins = {}
    pins = pins if isinstance(pins, dict) else {}
    pins[url] = digest
    atomic_write(path, lambda f: f.write(json.dumps(pins, indent=1, sort_keys=True).encode("utf-8")))


def _write_marker(model_dir: Path, info: dict[str, object]) -> None:
    """Write the completion marker last (and fsync it), so its presence implies the files are there."""
    path = model_dir / MARKER_NAME
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
