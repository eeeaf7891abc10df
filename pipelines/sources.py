"""What to label: a directory or prefix (recursive, by extension), a glob, or a manifest.

A manifest (Parquet, CSV or a text file of URIs, one per line) lets a job over 100M objects skip
listing the bucket. Parquet manifests are read by Ray Data itself, so they never pass through
the driver; listings and CSV/text manifests are built in the driver as one Arrow column.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv

from instseg_core.inputs import IMAGE_SUFFIXES
from pipelines.storage import S3Options, fsspec_fs, is_remote

MANIFEST_SUFFIXES = (".parquet", ".csv", ".txt", ".lst")
URI_COLUMNS = ("uri", "url", "path", "file", "file_name", "key")


class SourceError(ValueError):
    """A source that cannot be listed or a manifest that cannot be read."""


@dataclass(frozen=True)
class Source:
    """A resolved source: a Parquet manifest to hand to Ray Data, or URIs listed here."""

    uris: pa.Array | None = None
    parquet_manifest: str | None = None
    uri_column: str = "uri"


def _with_scheme(path: str, protocol: str) -> str:
    return path if protocol == "file" else f"{protocol}://{path}"


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def _has_glob(uri: str) -> bool:
    return any(ch in uri for ch in "*?[")


def list_images(source: str, extensions: tuple[str, ...] = IMAGE_SUFFIXES, s3: S3Options | None = None) -> list[str]:
    """Image URIs under a directory/prefix (recursive) or matching a glob, sorted; a single image
    file gives itself. Remote URIs keep their scheme (``s3://bucket/key``)."""
    fs = fsspec_fs(source, s3)
    fs.invalidate_cache()  # list what is there now, not what this process saw earlier
    protocol = _protocol(source)
    exts = tuple(e.lower() for e in extensions)
    if _has_glob(source):
        found = fs.glob(source)
    elif fs.isfile(source):
        return [source if is_remote(source) else os.path.abspath(source)]
    elif fs.isdir(source):
        found = fs.find(source)
    else:
        raise SourceError(f"input {source} does not exist (no such file, directory or prefix)")
    uris = sorted(_with_scheme(p, protocol) for p in found if p.lower().endswith(exts))
    if not uris:
        raise SourceError(f"no image files ({', '.join(exts)}) found under {source}")
    return uris


def _pick_column(names: list[str], source: str) -> str:
    for c in URI_COLUMNS:
        if c in names:
            return c
    if len(names) == 1:
        return names[0]
    raise SourceError(f"manifest {source} has columns {names}; name the URI column one of {URI_COLUMNS}")


def _resolve_relative(uris: list[str], manifest: str) -> list[str]:
    """Relative local paths in a local manifest are relative to the manifest's directory."""
    if is_remote(manifest):
        return uris
    base = os.path.dirname(os.path.abspath(manifest))
    return [u if is_remote(u) or os.path.isabs(u) else os.path.normpath(os.path.join(base, u)) for u in uris]


def read_text_or_csv_manifest(manifest: str, s3: S3Options | None = None) -> list[str]:
    """URIs from a CSV (with a header naming the URI column, or one column) or text manifest."""
    fs = fsspec_fs(manifest, s3)
    try:
        with fs.open(manifest, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SourceError(f"manifest {manifest} does not exist") from None
    if manifest.lower().endswith(".csv"):
        try:
            table = pacsv.read_csv(io.BytesIO(data))
        except pa.ArrowInvalid as e:
            raise SourceError(f"manifest {manifest} is not valid CSV: {e}") from None
        col = _pick_column(table.column_names, manifest)
        uris = [u for u in table[col].to_pylist() if u]
    else:
        lines = data.decode("utf-8").splitlines()
        uris = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not uris:
        raise SourceError(f"manifest {manifest} lists no URIs")
    return _resolve_relative(uris, manifest)


def parquet_uri_column(manifest: str, s3: S3Options | None = None) -> str:
    """The URI column of a Parquet manifest (read from its schema only)."""
    import pyarrow.parquet as pq

    fs = fsspec_fs(manifest, s3)
    try:
        with fs.open(manifest, "rb") as f:
            names = pq.read_schema(f).names
    except FileNotFoundError:
        raise SourceError(f"manifest {manifest} does not exist") from None
    return _pick_column(names, manifest)


def input_root(source: str) -> str | None:
    """The directory or prefix the images of ``--input`` lie under (what COCO ``file_name``s are
    relative to): the directory/prefix itself, a glob's fixed leading directories, a single file's
    directory; None for a manifest (its URIs may lie anywhere)."""
    lower = source.lower()
    if lower.endswith(MANIFEST_SUFFIXES) and not _has_glob(source):
        return None
    remote = is_remote(source)
    path = source if remote else os.path.abspath(source)
    if _has_glob(path):
        head = path[:min(path.index(ch) for ch in "*?[" if ch in path)]
        return head.rsplit("/", 1)[0] if "/" in head else head
    if (not remote and os.path.isfile(path)) or lower.endswith(IMAGE_SUFFIXES):
        return path.rsplit("/", 1)[0]
    return path.rstrip("/")


def resolve_source(source: str, extensions: tuple[str, ...] = IMAGE_SUFFIXES, s3: S3Options | None = None) -> Source:
    """Turn ``--input`` into a :class:`Source`: manifests by suffix, else a listing."""
    lower = source.lower()
    if lower.endswith(".parquet") and not _has_glob(source):
        return Source(parquet_manifest=source, uri_column=parquet_uri_column(source, s3))
    if lower.endswith(MANIFEST_SUFFIXES[1:]) and not _has_glob(source):
        return Source(uris=pa.array(read_text_or_csv_manifest(source, s3), pa.string()))
    return Source(uris=pa.array(list_images(source, extensions, s3), pa.string()))
