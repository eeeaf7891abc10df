"""Parquet part files (atomic, idempotent), the done set for resume, de-duplication, the summary.

Layout under the output dir/prefix::

    parts/part-<hash>.parquet   rows (pipelines.rows.ROW_SCHEMA); <hash> is derived from the part's
                                image ids, so a retried write of the same rows replaces, not adds
    coco_results.json           COCO results list           (pipelines.exports)
    coco_dataset.json           COCO dataset (labels)       (pipelines.exports)
    labelme/<stem>.json         optional, for review in LabelMe
    summary.json                counts by status, errors by kind, images/s, wall time, run id
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.rows import ROW_SCHEMA
from pipelines.storage import S3Options, fsspec_fs, is_remote, join, write_bytes_atomic

log = logging.getLogger("instseg")

PARTS_DIR = "parts"


def parts_uri(output: str) -> str:
    return join(output, PARTS_DIR)


def part_name(image_ids: np.ndarray) -> str:
    """A part file name determined by the set of image ids it holds."""
    digest = hashlib.sha1(np.sort(np.asarray(image_ids, dtype=np.int64)).tobytes()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_part(table: pa.Table, output: str, s3: S3Options | None = None) -> str:
    """Write rows as one Parquet file under ``<output>/parts/``, atomically; returns its URI."""
    table = table.cast(ROW_SCHEMA)
    uri = join(parts_uri(output), part_name(table.column("image_id").to_numpy()))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(uri, buf.getvalue(), s3)
    return uri


def list_parts(output: str, s3: S3Options | None = None) -> list[str]:
    """Finished part files (staging files start with '.' and are ignored), sorted."""
    fs = fsspec_fs(output, s3)
    root = parts_uri(output)
    fs.invalidate_cache()  # parts are written by other processes: s3fs's cached listings would be stale
    if not fs.exists(root):
        return []
    names = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")
             and p.endswith(".parquet")]
    prefix = output.split("://", 1)[0] + "://" if is_remote(output) else ""
    return sorted(prefix + p if prefix and not p.startswith(prefix) else p for p in names)


def _read_columns(uri: str, columns: list[str], s3: S3Options | None) -> pa.Table:
    with fsspec_fs(uri, s3).open(uri, "rb") as f:
        return pq.read_table(f, columns=columns)


def done_image_ids(output: str, s3: S3Options | None = None) -> np.ndarray:
    """Sorted unique image ids already written under ``output`` (8 bytes each: 100M ids = 800 MB)."""
    ids = [_read_columns(p, ["image_id"], s3).column("image_id").to_numpy() for p in list_parts(output, s3)]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)


def deduplicate_parts(output: str, s3: S3Options | None = None) -> int:
    """Make every image appear in exactly one row: rewrite parts holding ids seen in an earlier part.

    Duplicates only arise when a failure made Ray redo rows that a part file already held under
    a different grouping. Returns the number of rows dropped.
    """
    seen: set[int] = set()
    dropped = 0
    fs = fsspec_fs(output, s3)
    for uri in list_parts(output, s3):
        ids = _read_columns(uri, ["image_id"], s3).column("image_id").to_numpy()
        dup = np.fromiter((i in seen for i in ids.tolist()), dtype=bool, count=len(ids))
        # an id repeated inside this one part counts as a duplicate too
        _, first = np.unique(ids, return_index=True)
        inner = np.ones(len(ids), dtype=bool)
        inner[first] = False
        drop = dup | inner
        if drop.any():
            table = _read_columns(uri, ROW_SCHEMA.names, s3).filter(pa.array(~drop))
            dropped += int(drop.sum())
            if table.num_rows:
                write_part(table, output, s3)  # new name from the remaining ids; then remove the old one
            fs.rm(uri)
            log.info("removed %d duplicate row(s) from %s", int(drop.sum()), uri)
        seen.update(ids[~drop].tolist())
    return dropped


def remove_staging_files(output: str, s3: S3Options | None = None) -> int:
    """Delete temp files that writers killed mid-write left in ``parts/`` (call when no writer runs)."""
    fs = fsspec_fs(output, s3)
    root = parts_uri(output)
    if is_remote(output) or not fs.exists(root):
        return 0  # object stores have no partial objects to clean
    stale = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith(".")]
    for p in stale:
        fs.rm(p)
    return len(stale)


def summarize(output: str, s3: S3Options | None = None) -> dict[str, Any]:
    """Counts over every row under ``output``: by status, errors by kind, instances."""
    status: Counter = Counter()
    kinds: Counter = Counter()
    instances = 0
    for uri in list_parts(output, s3):
        t = _read_columns(uri, ["status", "error_kind", "num_instances"], s3)
        status.update(t.column("status").to_pylist())
        kinds.update(k for k in t.column("error_kind").to_pylist() if k)
        instances += int(pc.sum(t.column("num_instances")).as_py() or 0)
    return {"images": sum(status.values()), "by_status": dict(status), "errors_by_kind": dict(kinds),
            "instances": instances}


def write_json(uri: str, data: Any, s3: S3Options | None = None) -> None:
    """Small JSON files (summary, run config), published atomically."""
    write_bytes_atomic(uri, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"), s3)

