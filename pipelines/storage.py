"""pyarrow's view of storage: the filesystem Ray Data, Ray Train and Parquet I/O take.

Everything else about files and URIs (URI kinds, S3 settings, fsspec, atomic writes, caches, redaction)
lives in :mod:`instseg_core.io`; this module holds only what needs pyarrow.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.fs as pafs

from instseg_core.io import S3Options, fsspec_fs, is_remote, is_s3


def arrow_fs(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (Ray Data and Parquet I/O take these); S3 settings
    as :class:`instseg_core.io.S3Options` resolves them."""
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
