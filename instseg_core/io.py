"""File and URI helpers of the core: local files written the safe way (all at once: temp file in
the same directory + rename, with the permissions an ordinary ``open(path, "w")`` would give,
``0666 & ~umask``; ``mkstemp``'s 0600 would make outputs unreadable to the rest of a team), and
URIs with their secrets removed before they are logged or stored."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "current_umask", "redact"]


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is racy)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, fsync: bool = False,
                 publish: Callable[[Path, Path], Any] | None = None) -> None:
    """Write ``path`` through ``write(binary_file)`` into a hidden temp sibling, then move it in
    place (``os.replace``, or ``publish(tmp, path)``, e.g. to back the old file up first): readers
    never see a partial file, and a failure leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        (publish or os.replace)(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# query parameters that carry credentials: AWS SigV2/SigV4 presigned URLs, GCS signed URLs,
# Azure SAS tokens, and the generic token/key/signature names
_SECRET_PARAMS = frozenset({"signature", "awsaccesskeyid", "expires", "sig", "se", "sp", "sv", "sr", "st", "skoid",
                            "sktid", "skt", "ske", "sks", "skv", "spr", "token", "access_token", "api_key", "apikey",
                            "key", "password", "secret", "credential", "x-amz-security-token"})
_SECRET_PREFIXES = ("x-amz-", "x-goog-")


def _is_secret_param(name: str) -> bool:
    name = name.lower()
    return name in _SECRET_PARAMS or name.startswith(_SECRET_PREFIXES)


def redact(uri: str) -> str:
    """The URI without secrets, safe to log and to store in outputs: no ``user:password@`` part and
    no credential query parameters (presigned S3/GCS URLs, Azure SAS, ``token=``...); other query
    parameters stay, so two different images never share a redacted URI. The job reads with the
    original and writes this everywhere (image ids are derived from it, so re-signed URLs of the
    same object keep their id)."""
    uri = re.sub(r"^([a-zA-Z0-9+.-]+://)[^/@?#]*@", r"\1", uri)
    if "?" not in uri or "://" not in uri:
        return uri
    head, _, rest = uri.partition("?")
    query, hash_, fragment = rest.partition("#")
    kept = [p for p in query.split("&") if p and not _is_secret_param(p.split("=", 1)[0])]
    return head + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
