"""Parquet part files (atomic, idempotent, one shard each), per-shard completion, the summary.

Layout under the output dir/prefix::

    _plan/plan.json             the input's shards (pipelines.shards), written by the first run
    _plan/listing/*.parquet     listing pages (directory/prefix inputs)
    _plan/done/<shard>.<flag>.json
                                a finished shard's counts; <flag> (clean, permanent, transient) says
                                whether it has error rows a rerun may retry, so a rerun decides which
                                shards to skip from one listing, without reading a part
    parts/part-<shard>-<hash>.parquet
                                rows (pipelines.rows.ROW_SCHEMA) of one shard; <hash> is derived from
                                the part's image ids, so a retried write of the same rows replaces,
                                not adds; the file's metadata records the shard's URI count
    coco_results.json           COCO results list           (pipelines.writers)
    coco_dataset.json           COCO dataset (labels)       (pipelines.writers)
    labelme/<stem>.json         optional, for review in LabelMe
    summary.json                counts by status, errors by kind, images/s, wall time, run id

Resume needs no global set of done ids: a rerun skips shards with a done marker and gives each
other shard only its own parts to read (at most ~shard_size ids).
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

from instseg_core.io import S3Options, fsspec_fs, is_remote, join, write_bytes_atomic
from pipelines.rows import ROW_SCHEMA, STATUS_OK

log = logging.getLogger("instseg")

PARTS_DIR = "parts"


def parts_uri(output: str) -> str:
    return join(output, PARTS_DIR)


def part_name(image_ids: np.ndarray, shard_id: str = "s") -> str:
    """A part file name determined by its shard and the set of image ids it holds."""
    digest = hashlib.sha1(np.sort(np.asarray(image_ids, dtype=np.int64)).tobytes()).hexdigest()[:20]
    return f"part-{shard_id}-{digest}.parquet"


def shard_of_part(uri: str) -> str:
    """The shard id in a part file's name (``part-<shard>-<hash>.parquet``)."""
    return uri.rsplit("/", 1)[-1].split("-")[1]


def write_part(table: pa.Table, output: str, s3: S3Options | None = None, *, shard_id: str = "s",
               shard_total: int | None = None, shard_duplicates: int = 0) -> str:
    """Write rows of one shard as one Parquet file under ``<output>/parts/``, atomically; returns
    its URI. ``shard_total`` (unique URIs in the shard) and ``shard_duplicates`` (URIs repeated in
    the source) go into the file's metadata for the completion check."""
    table = table.cast(ROW_SCHEMA)
    meta = {b"instseg.shard": shard_id.encode(), b"instseg.shard_duplicates": str(shard_duplicates).encode()}
    if shard_total is not None:
        meta[b"instseg.shard_total"] = str(shard_total).encode()
    table = table.replace_schema_metadata(meta)
    uri = join(parts_uri(output), part_name(table.column("image_id").to_numpy(), shard_id))
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


def parts_by_shard(parts: list[str]) -> dict[str, list[str]]:
    """Part URIs grouped by the shard in their names."""
    out: dict[str, list[str]] = {}
    for uri in parts:
        out.setdefault(shard_of_part(uri), []).append(uri)
    return out


#: error kinds that may succeed on a rerun (storage hiccups, a predictor that died or ran out of
#: memory under load); the others describe the image itself
TRANSIENT_ERRORS = frozenset({"read_error", "predict_error", "out_of_memory", "crashed", "timeout"})


def done_ids_of(parts: list[str], s3: S3Options | None = None, *, retry: str = "transient") -> np.ndarray:
    """Sorted ids of one shard's parts that a rerun must not predict again. ``retry``: which error
    rows are redone instead: ``"transient"`` (:data:`TRANSIENT_ERRORS`), ``"all"`` or ``"none"``."""
    ids = []
    for uri in parts:
        t = _read_columns(uri, ["image_id", "status", "error_kind"], s3)
        keep = np.ones(t.num_rows, dtype=bool)
        if retry != "none":
            kinds = t.column("error_kind").to_pylist()
            errors = np.array([s != STATUS_OK for s in t.column("status").to_pylist()], dtype=bool)
            redo = errors if retry == "all" else errors & np.array([k in TRANSIENT_ERRORS for k in kinds], dtype=bool)
            keep &= ~redo
        ids.append(t.column("image_id").to_numpy()[keep])
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)


DONE_DIR = "_plan/done"


def _marker_flag(counts: dict[str, Any]) -> str:
    """What a finished shard's errors allow a rerun to redo: ``transient`` (some error rows of
    :data:`TRANSIENT_ERRORS`), ``permanent`` (error rows of other kinds only) or ``clean``."""
    kinds = counts["errors_by_kind"]
    if any(k in TRANSIENT_ERRORS for k in kinds):
        return "transient"
    return "permanent" if kinds else "clean"


def _markers(output: str, s3: S3Options | None) -> dict[str, str]:
    """shard id -> marker URI, from one listing of ``_plan/done/`` (``<shard>.<flag>.json``)."""
    fs = fsspec_fs(output, s3)
    root = join(output, DONE_DIR)
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    prefix = output.split("://", 1)[0] + "://" if is_remote(output) else ""
    return {p.rsplit("/", 1)[-1].split(".")[0]: (prefix + p if prefix and not p.startswith(prefix) else p)
            for p in fs.ls(root, detail=False) if p.endswith(".json")}


def done_shards(output: str, s3: S3Options | None = None, *, retry: str = "transient") -> set[str]:
    """Finished shards a rerun skips (one listing; no part is read): every marked shard, but for
    those holding error rows that ``retry`` (as in :func:`done_ids_of`) redoes."""
    redo = {"none": set(), "transient": {"transient"}, "all": {"transient", "permanent"}}[retry]
    return {shard for shard, uri in _markers(output, s3).items() if uri.rsplit(".", 2)[-2] not in redo}


def clear_markers(output: str, shard_ids: set[str], s3: S3Options | None = None) -> None:
    """Remove the done markers of shards about to be redone (their counts will change)."""
    fs = fsspec_fs(output, s3)
    for shard, uri in _markers(output, s3).items():
        if shard in shard_ids:
            fs.rm(uri)


def _row_counts(tables: list[pa.Table]) -> dict[str, Any]:
    """Counts of rows, plus what the COCO writers need to hand out sequential ids: ok images
    (``coco_images``) and their instances with a non-empty mask (``coco_annotations``)."""
    status: Counter = Counter()
    kinds: Counter = Counter()
    instances = annotations = 0
    for t in tables:
        status.update(t.column("status").to_pylist())
        kinds.update(k for k in t.column("error_kind").to_pylist() if k)
        instances += int(pc.sum(t.column("num_instances")).as_py() or 0)
        ok = t.filter(pc.equal(t.column("status"), STATUS_OK)).column("instances")
        if len(ok):
            areas = pc.struct_field(pc.list_flatten(ok), "area")
            annotations += int(pc.sum(pc.greater(areas, 0)).as_py() or 0)
    return {"images": sum(status.values()), "by_status": dict(status), "errors_by_kind": dict(kinds),
            "instances": instances, "coco_images": status.get(STATUS_OK, 0), "coco_annotations": annotations}


def finish_shard(output: str, shard_id: str, parts: list[str], s3: S3Options | None = None) -> dict[str, Any]:
    """Make each image of one shard appear in exactly one row, then count the shard; write its done
    marker when every URI of the shard has a row. Returns the counts plus ``complete``,
    ``duplicates_removed`` and ``source_duplicates``.

    Two rows of one image arise when a failure made Ray redo rows that a part already held, or when
    a rerun redid an error row: an ok row wins over an error row, else the earlier part's row.
    Call only when no writer runs."""
    fs = fsspec_fs(output, s3)
    for flag in ("clean", "permanent", "transient"):
        marker = join(output, DONE_DIR, f"{shard_id}.{flag}.json")
        if fs.exists(marker):
            with fs.open(marker, "rb") as f:
                return json.load(f)
    parts = sorted(parts)
    tables, totals, source_dups = [], [], []
    for uri in parts:
        with fs.open(uri, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        totals.append(int(meta[b"instseg.shard_total"]) if b"instseg.shard_total" in meta else None)
        source_dups.append(int(meta.get(b"instseg.shard_duplicates", b"0")))
        tables.append(_read_columns(uri, ["image_id", "status", "error_kind", "num_instances", "instances"], s3))
    # which row of each id survives: ok before error, then part order, then row order
    ids = np.concatenate([t.column("image_id").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    is_error = np.concatenate([np.array([s != STATUS_OK for s in t.column("status").to_pylist()], dtype=bool)
                               for t in tables]) if tables else np.zeros(0, bool)
    order = np.lexsort((np.arange(len(ids)), is_error, ids))
    keep = np.zeros(len(ids), dtype=bool)
    first = np.ones(len(order), dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    keep[order[first]] = True
    removed = int((~keep).sum())
    offset = 0
    kept_tables = []
    for uri, t, total in zip(parts, tables, totals):
        mask = keep[offset:offset + t.num_rows]
        offset += t.num_rows
        if mask.all():
            kept_tables.append(t)
            continue
        full = _read_columns(uri, ROW_SCHEMA.names, s3).filter(pa.array(mask))
        if full.num_rows:  # the new name comes from the remaining ids; then remove the old file
            write_part(full, output, s3, shard_id=shard_id, shard_total=total,
                       shard_duplicates=max(source_dups, default=0))
        fs.rm(uri)
        kept_tables.append(t.filter(pa.array(mask)))
        log.info("removed %d duplicate row(s) from %s", int((~mask).sum()), uri)
    counts = _row_counts(kept_tables)
    known = [t for t in totals if t is not None]
    total = max(known) if known else None
    counts.update(shard=shard_id, duplicates_removed=removed, source_duplicates=max(source_dups, default=0),
                  total=total, complete=total is not None and counts["images"] == total)
    if counts["complete"]:
        marker = join(output, DONE_DIR, f"{shard_id}.{_marker_flag(counts)}.json")
        write_bytes_atomic(marker, json.dumps(counts).encode("utf-8"), s3)
    return counts


def mark_empty_shard(output: str, shard_id: str, source_duplicates: int, s3: S3Options | None = None) -> None:
    """The done marker of a shard with nothing to label (only comments, blank lines or repeats of
    other shards' URIs): it has no part to hold its counts, so the marker does."""
    counts = {"images": 0, "by_status": {}, "errors_by_kind": {}, "instances": 0, "coco_images": 0,
              "coco_annotations": 0, "shard": shard_id, "duplicates_removed": 0,
              "source_duplicates": source_duplicates, "total": 0, "complete": True}
    write_bytes_atomic(join(output, DONE_DIR, f"{shard_id}.clean.json"), json.dumps(counts).encode("utf-8"), s3)


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


def write_json(uri: str, data: Any, s3: S3Options | None = None) -> None:
    """Small JSON files (summary, run config), published atomically."""
    write_bytes_atomic(uri, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"), s3)

