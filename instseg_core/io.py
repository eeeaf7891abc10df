"""Files and storage for every layer: local paths and URIs (``s3://``, ``http(s)://``, any fsspec URL)
through one set of helpers, so S3 settings, atomic writes and local caches of remote things are
each decided in one place.

* **URI kinds**: :func:`is_remote`, :func:`is_s3`, :func:`is_http`, :func:`join`.
* **S3 settings**: :class:`S3Options`, from the standard AWS places: credentials from the
  environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``),
  ``AWS_PROFILE`` or the instance role (s3fs/botocore find them; they are never passed through
  arguments that get logged); the region from ``AWS_REGION``/``AWS_DEFAULT_REGION``; an
  S3-compatible endpoint (MinIO, Ceph, moto) from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` or
  an explicit override (``--s3-endpoint``).
* **Reading**: :func:`fsspec_fs`, :func:`url_to_fs`, :func:`open_uri`, :func:`read_uri`.
* **Writing all at once**: :func:`atomic_open`/:func:`atomic_write` for local files (temp file in
  the same directory + rename, with the permissions an ordinary ``open(path, "w")`` would give,
  ``0666 & ~umask``; ``mkstemp``'s 0600 would make outputs unreadable to the rest of a team);
  :func:`write_uri`/:func:`write_bytes_atomic` for any URI (one upload on object stores, where an
  object appears only when its upload completes).
* **Local caches of remote things**: :func:`cached_fetch` (``cache_root()/<kind>/<hash>``, copied
  once per host under a file lock and renamed into place), with :func:`cache_root`,
  :func:`file_lock`, :func:`replace_dir`.
* **Messages**: :func:`redact` removes secrets from URIs before they are logged or stored;
  :func:`storage_error_message` turns the storage errors a user can fix into one line.

fsspec and s3fs are imported only when a URI needs them: local-only use does not pay for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

try:  # POSIX only; elsewhere concurrent callers are not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import fsspec
    import fsspec.core

__all__ = ["S3Options", "atomic_open", "atomic_write", "cache_root", "cached_fetch", "current_umask", "file_lock",
           "fsspec_fs", "is_http", "is_remote", "is_s3", "join", "open_uri", "read_uri", "redact", "remove_temps",
           "replace_dir", "storage_error_message", "temp_prefix", "url_to_fs", "write_bytes_atomic", "write_uri"]

logger = logging.getLogger("instseg")


# ---------------------------------------------------------------------------------------- URI kinds


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names something outside the local file system (``file://`` is local)."""
    uri = os.fspath(uri)
    return "://" in uri and not uri.startswith("file://")


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an S3 URI (``s3://`` or Hadoop's ``s3a://``)."""
    return uri.startswith(("s3://", "s3a://"))


def is_http(uri: str) -> bool:
    """Whether ``uri`` is an ``http://`` or ``https://`` URL (scheme in any case)."""
    return uri.lower().startswith(("http://", "https://"))


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with ``/`` (works for local paths and URIs)."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def _local_path(uri: str) -> str:
    return os.path.abspath(uri.removeprefix("file://"))


# ------------------------------------------------------------------------------------- S3 settings


@dataclass(frozen=True)
class S3Options:
    """Where S3 lives; None means the AWS defaults from the environment."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None) -> S3Options:
        """The given endpoint/region, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` and
        ``AWS_REGION``/``AWS_DEFAULT_REGION``."""
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )

    def fsspec_options(self) -> dict[str, Any]:
        """The s3fs keyword arguments for these settings."""
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        return {"client_kwargs": client_kwargs}


def _fs_options(uri: str, s3: S3Options | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri``: the S3 settings for ``s3://`` (``extra``'s
    ``client_kwargs`` win key by key), ``extra`` alone otherwise."""
    extra = dict(extra or {})
    if not is_s3(uri):
        return extra
    options = (s3 or S3Options.from_env()).fsspec_options()
    options["client_kwargs"].update(extra.pop("client_kwargs", None) or {})
    return {**options, **extra}


# ------------------------------------------------------------------------------------------ reading


def fsspec_fs(uri: str, s3: S3Options | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a URI (s3fs with the endpoint/region settings for ``s3://``); its
    methods take the full URI."""
    import fsspec

    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return fsspec.filesystem("s3" if is_s3(uri) else protocol, **_fs_options(uri, s3))


def url_to_fs(uri: str, s3: S3Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path inside it (chained URLs such as
    ``zip::s3://...`` work too)."""
    import fsspec.core

    return fsspec.core.url_to_fs(uri, **_fs_options(uri, s3))


def open_uri(uri: str, mode: str = "rb", s3: S3Options | None = None, **storage_options: Any) -> fsspec.core.OpenFile:
    """An fsspec ``OpenFile`` for a path or URI (use it in ``with``); ``storage_options`` go to the
    filesystem (e.g. ``anon=True``), on top of the S3 settings."""
    import fsspec

    return fsspec.open(uri, mode, **_fs_options(uri, s3, storage_options))


def read_uri(uri: str, s3: S3Options | None = None) -> bytes:
    """All bytes of the object or file at ``uri``."""
    with open_uri(uri, "rb", s3) as f:
        return f.read()


# ------------------------------------------------------------------------------------------ writing


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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, *, fsync: bool = False,
                publish: Callable[[Path, Path], Any] | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s whole content into: a hidden temp sibling, moved in place
    (``os.replace``, or ``publish(tmp, path)``, e.g. to back the old file up first) when the block
    ends without an error. Readers never see a partial file; a failure leaves no temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        (publish or os.replace)(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, fsync: bool = False,
                 publish: Callable[[Path, Path], Any] | None = None) -> None:
    """Write the local file ``path`` through ``write(binary_file)``, all at once (see :func:`atomic_open`)."""
    with atomic_open(path, fsync=fsync, publish=publish) as f:
        write(f)


def write_uri(uri: str, write: Callable[[IO[bytes]], Any], s3: S3Options | None = None, *,
              fsync: bool = False) -> None:
    """Publish what ``write(binary_file)`` writes under ``uri`` all at once: :func:`atomic_write`
    locally, one upload on object stores (s3fs: a single PUT or a multipart upload; the object
    appears when it completes)."""
    if is_remote(uri):
        with fsspec_fs(uri, s3).open(uri, "wb") as f:
            write(f)
        return
    atomic_write(_local_path(uri), write, fsync=fsync)


def write_bytes_atomic(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Publish ``data`` under ``uri`` all at once (see :func:`write_uri`; fsynced locally)."""
    write_uri(uri, lambda f: f.write(data), s3, fsync=True)


# ------------------------------------------------------------------------------------------- caches


def cache_root() -> Path:
    """The cache root: ``$INSTSEG_HOME`` if set (and non-empty), else ``~/.cache/instseg``."""
    home = os.environ.get("INSTSEG_HOME")
    if home:
        return Path(home).expanduser()
    return Path.home() / ".cache" / "instseg"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; released on exit or when the process dies.
    ``waiting`` is logged when another holder makes us wait.

    flock locks belong to the open file description, so threads of one process that each open the
    file exclude each other too. The lock file is never deleted: unlinking it would let a waiter
    lock an orphaned inode while a newcomer locks a fresh one.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                logger.info("%s", waiting)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def temp_prefix(target: Path) -> str:
    """The name prefix of every temp made for ``target`` (hidden, beside it), so a crashed
    writer's leftovers can be found by :func:`remove_temps`."""
    return f".{target.name}.tmp-"


def remove_temps(folder: Path, prefix: str) -> None:
    """Delete the files and folders in ``folder`` whose names start with ``prefix`` (call only while
    holding the lock of the thing they were staging)."""
    for p in folder.glob(prefix + "*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def replace_dir(src: Path, target: Path) -> None:
    """Move the folder ``src`` to ``target``; an existing (incomplete or stale) ``target`` is moved
    aside first.

    ``os.replace`` cannot overwrite a non-empty dir, hence the two renames; between them the target
    name is briefly absent, never half-filled.
    """
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".old", dir=target.parent))
        os.replace(target, old / "stale")
    os.replace(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cached_fetch(uri: str, kind: str, fetch: Callable[[Path], Any], *, name: str = "",
                 ready: Callable[[Path], bool] | None = None) -> Path:
    """A local copy of ``uri`` at ``cache_root()/<kind>/<hash of uri>[-<name>]``, made once per host.

    ``fetch(staging)`` writes the copy, a file or a folder, at the path it is given: a hidden temp
    beside the target, renamed into place only when ``fetch`` returns, so the target name never
    holds a partial copy. An exclusive lock (``cache_root()/locks/``, outside the cache folder so
    that it holds copies only) makes concurrent processes and threads fetch once: whoever gets it
    second finds the copy. ``ready(target)`` (default: it exists) says whether a copy is usable; an
    unusable one is replaced. A failure leaves no temp behind and raises what ``fetch`` raised
    (``OSError`` for local disk trouble).
    """
    is_ready = ready or Path.exists
    root = cache_root() / kind
    key = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    target = root / (f"{key}-{name}" if name else key)
    if is_ready(target):
        logger.debug("%s: cache hit at %s", redact(uri), target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    locks = cache_root() / "locks"
    locks.mkdir(exist_ok=True)
    with file_lock(locks / f"{kind}-{target.name}.lock", f"{redact(uri)}: another process is fetching it, waiting"):
        if is_ready(target):  # made by whoever held the lock before us
            return target
        prefix = temp_prefix(target)
        remove_temps(root, prefix)  # left by a crashed fetch; safe: we hold the lock
        staging = root / f"{prefix}{uuid.uuid4().hex[:8]}"
        try:
            fetch(staging)
            if staging.is_dir():
                replace_dir(staging, target)
            else:
                os.replace(staging, target)
        finally:
            remove_temps(root, staging.name)
    logger.info("%s: cached at %s", redact(uri), target)
    return target


# ----------------------------------------------------------------------------------------- messages

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


def storage_error_message(uri: str, error: BaseException) -> str | None:
    """One line saying why ``uri`` could not be reached, for the storage errors a user can fix
    (missing credentials, access denied, unreachable endpoint, no such object); None for others."""
    where = redact(uri)
    try:
        from botocore import exceptions as boto
    except ImportError:  # no s3fs installed: only local/OS errors are possible
        boto = None
    if boto is not None:
        if isinstance(error, (boto.NoCredentialsError, boto.PartialCredentialsError)):
            return (f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                    f"AWS_PROFILE, or give the nodes an IAM role")
        if isinstance(error, boto.EndpointConnectionError):
            return f"cannot reach the S3 endpoint for {where}: {error} (check --s3-endpoint / AWS_ENDPOINT_URL)"
        if isinstance(error, boto.ClientError):
            return f"S3 refused {where}: {error}"
        if isinstance(error, boto.BotoCoreError):
            return f"cannot use S3 for {where}: {error}"
    if isinstance(error, PermissionError):
        return f"access denied to {where}: {error}"
    if isinstance(error, FileNotFoundError):
        return f"{where} does not exist"
    if isinstance(error, OSError):
        return f"cannot read {where}: {error}"
    return None
