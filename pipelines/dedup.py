"""Find URIs that a manifest lists more than once, across all of its shards, in Ray tasks.

A manifest of 100M URIs may repeat a URI anywhere (two exports concatenated, a retry list appended).
The first occurrence (in shard order, then line order) is the one labelled; every later one is
written down as a "drop" of its shard, which the shard's expansion skips and counts. Nothing of
this passes through the driver but counts: it is a hash shuffle over the object store.

1. *map*: a task per group of ``GROUP_SHARDS`` shards computes each URI's image id and splits the
   ``(id, shard, line)`` triples into ``buckets`` by id;
2. *reduce*: a task per bucket sorts its triples by ``(id, shard, line)``; a triple whose id equals
   its predecessor's is a repeat; the repeats are split by shard group again;
3. *write*: a task per shard group writes its repeats as one Parquet file
   (``<folder>/g<group>.parquet``: columns ``shard``, ``line``) and returns how many each shard has.

Memory: 16 bytes per URI in the object store (1.6 GB at 100M, spilled to disk if needed), and per
reduce task 1/``buckets`` of it (at most 64 buckets: 25 MB each at 100M).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from instseg_core.io import S3Options, fsspec_fs, join, redact, write_bytes_atomic
from pipelines.rows import image_id_for

GROUP_SHARDS = 100  # shards per map task and per drops file
MAX_BUCKETS = 64
TRIPLE = np.dtype([("id", np.int64), ("shard", np.int32), ("line", np.int32)])


def _ids_of_group(shards: Sequence[Any], first: int, buckets: int, uris_of: Callable[[Any, S3Options | None], list[str]],
                  s3: S3Options | None) -> tuple:
    """Map: the ``(id, shard, line)`` triples of shards ``first..first+len(shards)``, one array per
    bucket, then how many URIs the shards hold."""
    chunks = []
    for k, shard in enumerate(shards):
        uris = uris_of(shard, s3)
        triples = np.empty(len(uris), TRIPLE)
        triples["id"] = np.fromiter((image_id_for(redact(u)) for u in uris), np.int64, count=len(uris))
        triples["shard"] = first + k
        triples["line"] = np.arange(len(uris), dtype=np.int32)
        chunks.append(triples)
    triples = np.concatenate(chunks) if chunks else np.empty(0, TRIPLE)
    bucket = triples["id"] % buckets
    return (*(triples[bucket == b] for b in range(buckets)), len(triples))  # the count: for the plan


def _repeats_in_bucket(groups: int, *parts: np.ndarray) -> Any:
    """Reduce: the triples of one bucket that repeat an earlier one, one array per shard group."""
    triples = np.concatenate(parts) if parts else np.empty(0, TRIPLE)
    triples = triples[np.lexsort((triples["line"], triples["shard"], triples["id"]))]
    repeats = triples[1:][triples["id"][1:] == triples["id"][:-1]]
    group = repeats["shard"] // GROUP_SHARDS
    out = tuple(repeats[group == g] for g in range(groups))
    return out if groups > 1 else out[0]


def _write_group(path: str, s3: S3Options | None, *parts: np.ndarray) -> dict[int, int]:
    """Write: one shard group's repeats as a Parquet file; returns {shard index: repeats}."""
    repeats = np.concatenate(parts) if parts else np.empty(0, TRIPLE)
    if not len(repeats):
        return {}
    repeats = repeats[np.lexsort((repeats["line"], repeats["shard"]))]
    buf = io.BytesIO()
    pq.write_table(pa.table({"shard": pa.array(repeats["shard"]), "line": pa.array(repeats["line"])}), buf)
    write_bytes_atomic(path, buf.getvalue(), s3)
    shards, counts = np.unique(repeats["shard"], return_counts=True)
    return {int(s): int(c) for s, c in zip(shards, counts)}


def find_repeats(shards: Sequence[Any], uris_of: Callable[[Any, S3Options | None], list[str]], folder: str,
                 s3: S3Options | None = None) -> tuple[dict[int, tuple[str, int]], int]:
    """Every later occurrence of a URI in ``shards`` (``uris_of(shard, s3)`` lists a shard's URIs in
    a fixed order), written under ``folder``. Returns {shard index: (its drops file, how many)} for
    the shards that have repeats, and how many URIs the shards hold in all. URIs are compared
    redacted (a re-signed URL is the same image)."""
    import ray

    groups = max(1, -(-len(shards) // GROUP_SHARDS))
    buckets = max(1, min(MAX_BUCKETS, groups))
    mapper = ray.remote(num_cpus=0.5, max_retries=3)(_ids_of_group).options(num_returns=buckets + 1)
    reducer = ray.remote(num_cpus=0.5, max_retries=3)(_repeats_in_bucket).options(num_returns=groups)
    writer = ray.remote(num_cpus=0.25, max_retries=3)(_write_group)

    def as_list(refs: Any, n: int) -> list:
        return list(refs) if n > 1 else [refs]

    mapped = [mapper.remote(shards[g * GROUP_SHARDS:(g + 1) * GROUP_SHARDS], g * GROUP_SHARDS, buckets, uris_of, s3)
              for g in range(groups)]
    total = sum(ray.get([m[-1] for m in mapped]))
    reduced = [as_list(reducer.remote(groups, *[m[b] for m in mapped]), groups) for b in range(buckets)]
    del mapped  # the map outputs are freed once every reducer has read them
    paths = [join(folder, f"g{g:06d}.parquet") for g in range(groups)]
    written = [writer.remote(paths[g], s3, *[r[g] for r in reduced]) for g in range(groups)]
    out: dict[int, tuple[str, int]] = {}
    for g, ref in enumerate(written):
        for shard, count in ray.get(ref).items():
            out[shard] = (paths[g], count)
    return out, total


def repeated_lines(drops_file: str, shard_index: int, s3: S3Options | None = None) -> np.ndarray:
    """The line numbers (in the shard's URI order) that ``find_repeats`` marked in one shard."""
    with fsspec_fs(drops_file, s3).open(drops_file, "rb") as f:
        table = pq.read_table(f, filters=[("shard", "=", shard_index)])
    return table.column("line").to_numpy()
