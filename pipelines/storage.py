"""Local paths and ``s3://`` URIs through one interface (fsspec/s3fs for listing and small files,
pyarrow's filesystem for Parquet).

S3 settings come from the standard AWS places: credentials from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` or the
instance role; the region from ``AWS_REGION``/``AWS_DEFAULT_REGION``; an S3-compatible endpoint
(MinIO, Ceph, moto) from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` or an explicit override.
Credentials are never passed through arguments that get logged, and :func:`redact` strips any
that a URI carries.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs as pafs

from instseg_core.io import atomic_write, redact


@dataclass(frozen=True)
class S3Options:
    """Where S3 lives; None means the AWS defaults from the environment."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None) -> "S3Options":
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


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


def fsspec_fs(uri: str, s3: S3Options | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a URI (s3fs with the endpoint/region override for ``s3://``)."""
    if is_s3(uri):
        s3 = s3 or S3Options.from_env()
        client_kwargs: dict[str, Any] = {}
        if s3.endpoint_url:
            client_kwargs["endpoint_url"] = s3.endpoint_url
        if s3.region:
            client_kwargs["region_name"] = s3.region
        return fsspec.filesystem("s3", client_kwargs=client_kwargs)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return fsspec.filesystem(protocol)


def arrow_fs(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (Ray Data and Parquet I/O take these)."""
    if is_s3(uri):
        s3 = s3 or S3Options.from_env()
        kwargs: dict[str, Any] = {}
        if s3.endpoint_url:
            scheme, _, host = s3.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        if s3.region:
            kwargs["region"] = s3.region
        return pafs.S3FileSystem(**kwargs), uri.split("://", 1)[1]
    if is_remote(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs(uri))), uri.split("://", 1)[1]
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with ``/`` (works for local paths and URIs)."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def write_bytes_atomic(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Publish ``data`` under ``uri`` all at once: a temp file + rename locally, one PUT on object
    stores (an object appears only when its upload completes)."""
    if is_remote(uri):
        fs = fsspec_fs(uri, s3)
        with fs.open(uri, "wb") as f:
            f.write(data)
        return
    atomic_write(os.path.abspath(uri), lambda f: f.write(data), fsync=True)


def temp_name(final_name: str) -> str:
    """A hidden, unique sibling name for staging ``final_name`` (readers skip names starting '.')."""
    return f".{final_name}.{uuid.uuid4().hex[:8]}.tmp"
