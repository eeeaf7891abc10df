"""The job's input as a fixed sequence of shards that Ray tasks expand into URIs.

Nothing on the driver grows with the number of images: the driver holds one small :class:`Shard`
per ~``shard_size`` URIs (100M images at 1000 per shard: 100k shards, a few MB) and never a URI.

* **Text / CSV manifests** are cut into byte ranges from the file size alone; a line belongs to
  the range its first byte is in, so ranges never split or repeat a URI.
* **Parquet manifests** (a file or a folder of files) are cut into row ranges from the footers.
* **Directories and prefixes** are listed by Ray tasks, one per folder level (fanning out over
  sub-folders), each writing its files as Parquet pages under ``<output>/_plan/listing/`` while
  it lists (:func:`list_folder`): a task holds one page of URIs plus its folder's sub-folder names
  (and 8 bytes per URI of the folder's earlier pages when it lists again), so a flat folder or
  prefix of 100M objects is listed in the memory of one page.
* **A glob or a single file** is listed on the driver (globs are for modest inputs).

The plan (``<output>/_plan/plan.json`` and the listing pages) is written by the first run; a rerun
with the same output reads the same shards, which is what makes per-shard resume exact
(:mod:`pipelines.sinks`). A rerun over a directory/prefix lists it again, and each folder's task
compares with that folder's earlier pages: images added since become new shards appended to the
plan (the nightly "label what is new" run), the old shards stay as they were. A URI repeated
inside a shard is dropped there and counted.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from itertools import islice
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from instseg_core.io import S3Options, fsspec_fs, is_remote, is_s3, join, redact, write_bytes_atomic
from pipelines.rows import image_id_for

log = logging.getLogger("instseg")

PLAN_DIR = "_plan"
PLAN_FILE = "plan.json"
LISTING_DIR = "listing"
REPEATS_DIR = "repeats"
PLAN_VERSION = 2
MANIFEST_SUFFIXES = (".parquet", ".csv", ".txt", ".lst")
URI_COLUMNS = ("uri", "url", "path", "file", "file_name", "key")
_MAX_LINE = 1 << 16  # longest manifest line read past a range's end to finish its last URI


class SourceError(ValueError):
    """A source that cannot be listed or a manifest that cannot be read."""


@dataclass(frozen=True)
class Shard:
    """One unit of input: at most about ``shard_size`` URIs, expanded by :func:`expand_shard`."""

    shard_id: str  # "s" + its position in the plan, zero-padded: stable across reruns
    kind: str  # "lines" (text manifest), "csv", "parquet" (manifest or listing page)
    source: str  # the manifest or page file
    start: int = 0  # first byte (lines/csv) or first row (parquet)
    stop: int = 0  # byte or row stop (exclusive)
    column: str | None = None  # csv: the URI column's index as text; parquet: its name
    base: str | None = None  # local manifests: the folder relative paths are relative to
    drops: str | None = None  # manifests: the file naming this shard's URIs that repeat earlier ones

    @property
    def index(self) -> int:
        return int(self.shard_id[1:])


@dataclass
class Plan:
    """The shards of one job's input, as written under ``<output>/_plan/``."""

    input: str  # redacted
    shards: list[Shard]
    listed: int | None = None  # images found by listings, or a manifest's URIs less its repeats
    listing: bool = False  # a directory/prefix/glob: a rerun lists again and appends new images
    generation: int = 0  # how many times the input was listed again after the first
    new: int | None = None  # images the last listing added (None: not a relisting)
    manifest: dict[str, Any] | None = None  # what a manifest looked like when planned (see _manifest_state)
    repeats: int = 0  # manifests: URIs that repeat an earlier one (in any shard), dropped at expansion

    def to_json(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "input": self.input, "listed": self.listed, "listing": self.listing,
                "generation": self.generation, "manifest": self.manifest, "repeats": self.repeats,
                "shards": [{k: v for k, v in asdict(s).items() if v is not None} for s in self.shards]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        return cls(input=data["input"], listed=data.get("listed"), listing=data.get("listing", False),
                   generation=data.get("generation", 0), manifest=data.get("manifest"),
                   repeats=data.get("repeats", 0), shards=[Shard(**s) for s in data["shards"]])


def _shard_id(position: int) -> str:
    return f"s{position:08d}"


def _has_glob(uri: str) -> bool:
    return any(ch in uri for ch in "*?[")


def _with_scheme(path: str, like: str) -> str:
    return f"{like.split('://', 1)[0]}://{path}" if is_remote(like) and "://" not in path else path


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES) and not _has_glob(source)


# ---------------------------------------------------------------- planning (driver + listing tasks)


def load_or_make_plan(source: str, output: str, *, shard_size: int, extensions: tuple[str, ...],
                      s3: S3Options | None = None) -> Plan:
    """The plan stored under ``output`` (a rerun), else a new one for ``source``, stored there.

    A stored plan for another input is an error: mixing two inputs' shards under one output would
    break the exactly-once guarantee."""
    uri = join(output, PLAN_DIR, PLAN_FILE)
    fs = fsspec_fs(uri, s3)
    if fs.exists(uri):
        with fs.open(uri, "rb") as f:
            data = json.load(f)
        stored = str(data.get("input"))
        # plans of earlier versions may hold a relative path (the job now makes local paths absolute)
        if redact(source) not in (stored, stored if is_remote(stored) else os.path.abspath(stored)):
            raise SourceError(f"{redact(output)} holds the plan of input {data.get('input')}, not "
                              f"{redact(source)}: use a new --output (or delete {PLAN_DIR}/ to start over)")
        plan = Plan.from_json(data)
        if plan.listing:
            plan = relist(plan, source, output, shard_size=shard_size, extensions=extensions, s3=s3)
        else:
            grown = extend_manifest_plan(plan, source, shard_size=shard_size, s3=s3)
            if grown is plan:
                return plan
            plan = mark_repeats(grown, output, s3)
    else:
        plan = make_plan(source, output, shard_size=shard_size, extensions=extensions, s3=s3)
        if not plan.listing:
            plan = mark_repeats(plan, output, s3)
    write_bytes_atomic(uri, json.dumps(plan.to_json()).encode("utf-8"), s3)
    return plan


def mark_repeats(plan: Plan, output: str, s3: S3Options | None = None) -> Plan:
    """``plan`` with each shard pointing at the file of its URIs that repeat an earlier URI of the
    manifest (in Ray tasks: :func:`pipelines.dedup.find_repeats`). Listings need none: a folder
    cannot hold a path twice."""
    from pipelines.dedup import find_repeats

    folder = join(output, PLAN_DIR, REPEATS_DIR, f"gen{plan.generation:04d}")
    found, total = find_repeats(plan.shards, shard_uris_with_repeats, folder, s3)
    shards = [replace(sh, drops=found[sh.index][0] if sh.index in found else None) for sh in plan.shards]
    repeats = sum(n for _, n in found.values())
    if repeats:
        log.info("the manifest repeats %d URI(s) (over %d shard(s)): each is labelled once", repeats, len(found))
    return replace(plan, shards=shards, repeats=repeats, listed=total - repeats)


def _manifest_state(manifest: str, s3: S3Options | None) -> dict[str, Any]:
    """What a later run compares to tell an appended manifest from a changed one: for text, the size
    and hashes of the first and last 64 KiB; for Parquet, each file's row count."""
    fs = fsspec_fs(manifest, s3)
    if manifest.lower().endswith(".parquet"):
        files = {}
        for path in _parquet_files(manifest, s3):
            with fs.open(path, "rb") as f:
                files[path] = pq.ParquetFile(f).metadata.num_rows
        return {"files": files}
    size = int(fs.size(manifest))
    return {"size": size, **_text_fingerprint(manifest, size, s3)}


def _text_fingerprint(manifest: str, size: int, s3: S3Options | None) -> dict[str, Any]:
    with fsspec_fs(manifest, s3).open(manifest, "rb") as f:
        head = f.read(min(size, 1 << 16))
        f.seek(max(0, size - (1 << 16)))
        tail = f.read(size - max(0, size - (1 << 16)))
    return {"head": hashlib.sha256(head).hexdigest(), "tail": hashlib.sha256(tail).hexdigest(),
            "ends_line": tail.endswith((b"\n", b"\r"))}


def extend_manifest_plan(plan: Plan, source: str, *, shard_size: int, s3: S3Options | None = None) -> Plan:
    """``plan`` itself when the manifest is as planned; the plan plus shards for what was appended
    (text lines after the planned size, new Parquet files) when it grew; :class:`SourceError` when
    anything else changed (a rerun would then label other images under the same shard ids). Edits
    inside a text manifest's middle are not detected (only its first and last 64 KiB are compared)."""
    old = plan.manifest
    if old is None:  # a plan of an earlier version: taken as it is
        return plan
    fs = fsspec_fs(source, s3)
    if not fs.exists(source):
        raise SourceError(f"manifest {redact(source)} is gone; the plan under the output needs it")

    def changed(why: str) -> SourceError:
        return SourceError(f"manifest {redact(source)} changed since this output's plan was made ({why}); "
                           f"appended lines and added Parquet files are picked up, other changes are not: "
                           f"use a new --output")

    if "files" in old:
        now = _manifest_state(source, s3)["files"]
        for path, rows in old["files"].items():
            if path not in now:
                raise changed(f"{redact(path)} is gone")
            if now[path] != rows:
                raise changed(f"{redact(path)} has {now[path]} rows, not {rows}")
        added = [p for p in sorted(now) if p not in old["files"]]
        if not added:
            return plan
        shards: list[Shard] = []
        for path in added:
            shards += _parquet_shards(path, shard_size, s3, first=len(plan.shards) + len(shards))
        return replace(plan, shards=plan.shards + shards, manifest={"files": now}, generation=plan.generation + 1)
    size = int(fs.size(source))
    if size < old["size"]:
        raise changed(f"{size} bytes, fewer than the {old['size']} planned")
    if {k: old[k] for k in ("head", "tail", "ends_line")} != _text_fingerprint(source, old["size"], s3):
        raise changed("its planned bytes differ")
    if size == old["size"]:
        return plan
    if not old["ends_line"]:
        with fs.open(source, "rb") as f:
            f.seek(old["size"])
            if f.read(1) not in (b"\n", b"\r"):
                raise changed("its last line was extended")
    added = _text_shards(source, shard_size, s3, start=old["size"], first=len(plan.shards))
    return replace(plan, shards=plan.shards + added, manifest=_manifest_state(source, s3),
                   generation=plan.generation + 1)


def relist(plan: Plan, source: str, output: str, *, shard_size: int, extensions: tuple[str, ...],
           s3: S3Options | None = None) -> Plan:
    """``plan`` plus shards for the images that appeared since it was listed (old shards unchanged)."""
    generation = plan.generation + 1
    old_pages: dict[str, list[tuple[str, int]]] = {}
    for shard in plan.shards:
        old_pages.setdefault(_page_group(shard.source), []).append((shard.source, shard.stop))
    if _has_glob(source) or _is_file(source, s3):
        known = _known_ids([p for pages in old_pages.values() for p in pages], s3)
        uris = _unseen(_glob_or_file(source, extensions, s3), known, shard_size)
        pages = _write_pages(uris, join(output, PLAN_DIR, LISTING_DIR), f"glob-g{generation}", shard_size, s3)
    else:
        pages, _ = _list_tree(source, output, shard_size, extensions, s3, old_pages, generation)
    added = _page_shards(pages, first=len(plan.shards))
    new = sum(n for _, n in pages)
    return Plan(plan.input, plan.shards + added, listed=(plan.listed or 0) + new, listing=True,
                generation=generation, new=new)


def make_plan(source: str, output: str, *, shard_size: int, extensions: tuple[str, ...],
              s3: S3Options | None = None) -> Plan:
    """Shards for ``source`` (see the module doc); listing pages go under ``<output>/_plan/``."""
    lower = source.lower()
    if is_manifest(source):
        fs = fsspec_fs(source, s3)
        if not fs.exists(source):
            raise SourceError(f"manifest {redact(source)} does not exist")
        state = _manifest_state(source, s3)
        if lower.endswith(".parquet"):
            return Plan(redact(source), _parquet_shards(source, shard_size, s3), manifest=state)
        return Plan(redact(source), _text_shards(source, shard_size, s3), manifest=state)
    if _has_glob(source) or _is_file(source, s3):
        uris = _glob_or_file(source, extensions, s3)
        pages = _write_pages(uris, join(output, PLAN_DIR, LISTING_DIR), "glob", shard_size, s3)
        return Plan(redact(source), _page_shards(pages), listed=len(uris), listing=True)
    pages, listed = _list_tree(source, output, shard_size, extensions, s3)
    if not listed:
        raise SourceError(f"no image files ({', '.join(extensions)}) found under {redact(source)}")
    return Plan(redact(source), _page_shards(pages), listed=listed, listing=True)


def _is_file(source: str, s3: S3Options | None) -> bool:
    # info, not isfile + isdir: s3fs's isdir lists the whole prefix into memory (on the driver),
    # its info is a HEAD plus a one-key listing
    try:
        kind = fsspec_fs(source, s3).info(source)["type"]
    except FileNotFoundError:
        kind = None
    if kind not in ("file", "directory"):
        raise SourceError(f"input {redact(source)} does not exist (no such file, directory or prefix)")
    return kind == "file"


def _glob_or_file(source: str, extensions: tuple[str, ...], s3: S3Options | None) -> list[str]:
    fs = fsspec_fs(source, s3)
    if not _has_glob(source):
        return [source if is_remote(source) else os.path.abspath(source)]
    exts = tuple(e.lower() for e in extensions)
    found = sorted(_with_scheme(p, source) for p in fs.glob(source) if p.lower().endswith(exts))
    if not found:
        raise SourceError(f"no image files ({', '.join(exts)}) match {redact(source)}")
    return found


def _text_shards(manifest: str, shard_size: int, s3: S3Options | None, start: int = 0,
                 first: int = 0) -> list[Shard]:
    """Byte ranges of about ``shard_size`` lines from byte ``start`` on, sized from the first 64 KiB's
    mean line length; ids from ``first`` on."""
    fs = fsspec_fs(manifest, s3)
    size = int(fs.size(manifest))
    with fs.open(manifest, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise SourceError(f"manifest {redact(manifest)} lists no URIs")
    column = None
    if manifest.lower().endswith(".csv"):
        column = str(_csv_column(head, manifest))
    lines = max(1, head.count(b"\n"))
    step = max(4096, int(len(head) / lines * shard_size))
    base = None if is_remote(manifest) else os.path.dirname(os.path.abspath(manifest))
    kind = "csv" if column is not None else "lines"
    return [Shard(_shard_id(first + i), kind, manifest, lo, min(lo + step, size), column, base)
            for i, lo in enumerate(range(start, size, step))]


def _csv_column(head: bytes, manifest: str) -> int:
    header = next(csv.reader(io.StringIO(head.decode("utf-8", "replace").splitlines()[0])))
    names = [h.strip() for h in header]
    for c in URI_COLUMNS:
        if c in names:
            return names.index(c)
    if len(names) == 1:
        return 0
    raise SourceError(f"manifest {redact(manifest)} has columns {names}; name the URI column one of {URI_COLUMNS}")


def _parquet_files(manifest: str, s3: S3Options | None) -> list[str]:
    fs = fsspec_fs(manifest, s3)
    if fs.isdir(manifest):
        return sorted(_with_scheme(p, manifest) for p in fs.find(manifest) if p.endswith(".parquet"))
    return [manifest]


def _parquet_shards(manifest: str, shard_size: int, s3: S3Options | None, first: int = 0) -> list[Shard]:
    fs = fsspec_fs(manifest, s3)
    shards: list[Shard] = []
    column = None
    for path in _parquet_files(manifest, s3):
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        names = meta.schema.names
        column = next((c for c in URI_COLUMNS if c in names), names[0] if len(names) == 1 else None)
        if column is None:
            raise SourceError(f"manifest {redact(path)} has columns {names}; name the URI column one of "
                              f"{URI_COLUMNS}")
        base = None if is_remote(path) else os.path.dirname(os.path.abspath(path))
        for start in range(0, meta.num_rows, shard_size):
            shards.append(Shard(_shard_id(first + len(shards)), "parquet", path, start,
                                min(start + shard_size, meta.num_rows), column, base))
    if not shards:
        raise SourceError(f"manifest {redact(manifest)} lists no URIs")
    return shards


def _page_shards(pages: list[tuple[str, int]], first: int = 0) -> list[Shard]:
    return [Shard(_shard_id(first + i), "parquet", uri, 0, n, "uri") for i, (uri, n) in enumerate(pages)]


def _page_group(page_uri: str) -> str:
    """The folder key of a listing page (``page-<folder hash>-...`` -> ``page-<folder hash>``)."""
    return "-".join(page_uri.rsplit("/", 1)[-1].split("-")[:2])


def _known_ids(pages: list[tuple[str, int]], s3: S3Options | None) -> np.ndarray:
    """The sorted ids (:func:`image_id_for`, 63-bit hashes) of the URIs on ``pages`` (page URI, rows):
    8 bytes per old URI (a Python set of the URIs takes ~150), read one page at a time."""
    ids = np.empty(sum(n for _, n in pages), dtype=np.int64)
    filled = 0
    for page, _ in pages:
        with fsspec_fs(page, s3).open(page, "rb") as f:
            uris = pq.read_table(f, columns=["uri"]).column("uri").to_pylist()
        ids[filled:filled + len(uris)] = [image_id_for(u) for u in uris]  # raises if a page outgrew its rows
        filled += len(uris)
    ids = ids[:filled]
    ids.sort()
    return ids


def _unseen(uris: Iterable[str], known: np.ndarray, batch: int) -> Iterator[str]:
    """``uris`` without those whose id is in ``known`` (sorted), looked up ``batch`` at a time. Two
    URIs share an id with odds ~n/2^63 (1e-11 for a new URI against 100M old ones)."""
    it = iter(uris)
    while chunk := list(islice(it, batch)):
        ids = np.fromiter((image_id_for(u) for u in chunk), dtype=np.int64, count=len(chunk))
        if len(known):
            at = np.minimum(np.searchsorted(known, ids), len(known) - 1)
            yield from (u for u, seen in zip(chunk, known[at] == ids) if not seen)
        else:
            yield from chunk


def _write_pages(uris: Iterable[str], folder: str, name: str, shard_size: int,
                 s3: S3Options | None) -> list[tuple[str, int]]:
    """``uris`` as Parquet pages of at most ``shard_size`` rows, each sorted, written as the iterable
    yields them (one page in memory); returns (page URI, rows) each."""
    pages = []
    it = iter(uris)
    while chunk := sorted(islice(it, shard_size)):
        buf = io.BytesIO()
        pq.write_table(pa.table({"uri": pa.array(chunk, pa.string())}), buf)
        uri = join(folder, f"{name}-{len(pages):05d}.parquet")
        write_bytes_atomic(uri, buf.getvalue(), s3)
        pages.append((uri, len(chunk)))
    return pages


def _folder_key(folder: str) -> str:
    """The name that a folder's listing pages start with (what relistings group old pages by)."""
    return "page-" + hashlib.sha1(folder.rstrip("/").encode("utf-8")).hexdigest()[:16]


def _folder_entries(folder: str, s3: S3Options | None) -> Iterator[tuple[str, bool]]:
    """One folder level's entries as (path or URI, is a folder), streamed: local folders through
    ``os.scandir`` (filesystem order), S3 prefixes through ListObjectsV2 pages of up to 1000 keys
    (key order); other filesystems through one ``fs.ls`` (held whole)."""
    if is_s3(folder):
        yield from _s3_entries(folder, s3)
    elif not is_remote(folder):
        with os.scandir(folder) as it:
            for entry in it:
                # a symlink to a folder is not followed (as fsspec's ls): no cycles
                yield entry.path, entry.is_dir(follow_symlinks=False)
    else:
        for entry in fsspec_fs(folder, s3).ls(folder, detail=True):
            yield _with_scheme(entry["name"], folder), entry.get("type") == "directory"


@functools.lru_cache(maxsize=4)
def _s3_client(s3: S3Options) -> Any:
    """A botocore S3 client, one per process and settings: making one takes ~0.2 s of CPU, and a
    tree runs a listing task per folder (Ray reuses worker processes)."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
        config=Config(retries={"mode": "standard", "max_attempts": 10}))  # a failed task lists it all again


def _s3_entries(folder: str, s3: S3Options | None) -> Iterator[tuple[str, bool]]:
    """An S3 prefix's keys and sub-prefixes (without the trailing ``/``, as s3fs names them), one
    ListObjectsV2 page at a time. A plain botocore client: s3fs's ls gathers every page first."""
    scheme, _, path = folder.partition("://")
    bucket, _, prefix = path.partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    pages = _s3_client(s3 or S3Options.from_env()).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/")
    for page in pages:
        for sub in page.get("CommonPrefixes", ()):
            yield f"{scheme}://{bucket}/{sub['Prefix'][:-1]}", True
        for obj in page.get("Contents", ()):
            if obj["Key"] != prefix:  # the folder's own marker object
                yield f"{scheme}://{bucket}/{obj['Key']}", False


def list_folder(folder: str, output: str, shard_size: int, extensions: tuple[str, ...],
                s3: S3Options | None, old_pages: list[tuple[str, int]] | None = None,
                generation: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """One folder level: its image files (those not on ``old_pages``, the (page, rows) of the
    folder's earlier listings) written as pages under the output's plan while the folder is
    listed; returns its sorted sub-folders and the new pages. Runs as a Ray task (the driver only
    sees folder names).

    Memory: one page of URIs, the sub-folder names, and 8 bytes per URI on ``old_pages``; the
    entries are never gathered. Page ``k`` holds the ``k``-th ``shard_size`` image files in listing
    order, sorted: on S3 (keys listed in lexicographic order) the pages are the sorted listing;
    locally they follow the filesystem's directory order (stable while the folder is unchanged;
    sorting a 100M-entry folder would need all names, or an external sort). Only the listing that
    writes the pages needs it: later runs read them."""
    exts = tuple(e.lower() for e in extensions)
    subdirs: list[str] = []

    def image_files() -> Iterator[str]:
        for path, is_dir in _folder_entries(folder, s3):
            if is_dir:
                subdirs.append(path)
            elif path.lower().endswith(exts):
                yield path

    files = _unseen(image_files(), _known_ids(old_pages, s3), shard_size) if old_pages else image_files()
    name = _folder_key(folder) + (f"-g{generation}" if generation else "")
    pages = _write_pages(files, join(output, PLAN_DIR, LISTING_DIR), name, shard_size, s3)
    return sorted(subdirs), pages


def _list_tree(source: str, output: str, shard_size: int, extensions: tuple[str, ...], s3: S3Options | None,
               old_pages: dict[str, list[tuple[str, int]]] | None = None,
               generation: int = 0) -> tuple[list[tuple[str, int]], int]:
    """Breadth-first listing in Ray tasks (at most 64 folders in flight); pages in folder order.
    ``old_pages`` (folder key -> (page, rows) of earlier listings) makes each task list only new files."""
    import ray

    remote_list = ray.remote(num_cpus=0.25, max_retries=3)(list_folder)
    root = source.rstrip("/") if is_remote(source) else os.path.abspath(source)
    results: dict[str, list[tuple[str, int]]] = {}
    frontier, pending = [root], {}
    while frontier or pending:
        while frontier and len(pending) < 64:
            folder = frontier.pop()
            pending[remote_list.remote(folder, output, shard_size, extensions, s3,
                                       (old_pages or {}).get(_folder_key(folder)), generation)] = folder
        ready, _ = ray.wait(list(pending), num_returns=1)
        folder = pending.pop(ready[0])
        subdirs, pages = ray.get(ready[0])
        results[folder] = pages
        frontier.extend(subdirs)
    pages = [p for folder in sorted(results) for p in results[folder]]
    return pages, sum(n for _, n in pages)


# ---------------------------------------------------------------- expansion (Ray tasks)


def _resolve(uri: str, base: str | None) -> str:
    if base is None or is_remote(uri) or os.path.isabs(uri):
        return uri
    return os.path.normpath(os.path.join(base, uri))


def _range_lines(shard: Shard, s3: S3Options | None) -> Iterator[str]:
    """The lines whose first byte lies in ``[start, stop)``."""
    fs = fsspec_fs(shard.source, s3)
    # remote: one ranged GET covering the shard (s3fs's default 5 MB blocks would read ~50x more)
    options = {"block_size": shard.stop - shard.start + _MAX_LINE} if is_remote(shard.source) else {}
    with fs.open(shard.source, "rb", **options) as raw:
        f = io.BufferedReader(raw) if is_remote(shard.source) else raw  # fsspec's readline takes no limit
        if shard.start > 0:
            f.seek(shard.start - 1)
            if f.read(1) != b"\n":
                f.readline(_MAX_LINE)  # the line that began before this range belongs to the previous shard
        while f.tell() < shard.stop:
            line = f.readline(_MAX_LINE)
            if not line:
                break
            yield line.decode("utf-8").rstrip("\r\n")


def shard_uris(shard: Shard, s3: S3Options | None = None) -> list[str]:
    """The URIs of one shard, in manifest order, without those that repeat an earlier URI of the
    manifest in another shard (:func:`mark_repeats`); repeats inside the shard are still there."""
    return _without_marked(shard, shard_uris_with_repeats(shard, s3), s3)


def _without_marked(shard: Shard, uris: list[str], s3: S3Options | None) -> list[str]:
    if not shard.drops:
        return uris
    from pipelines.dedup import repeated_lines

    drop = set(repeated_lines(shard.drops, shard.index, s3).tolist())
    return [u for k, u in enumerate(uris) if k not in drop]


def shard_uris_with_repeats(shard: Shard, s3: S3Options | None = None) -> list[str]:
    """The URIs of one shard, in manifest order, repeats included."""
    if shard.kind == "parquet":
        fs = fsspec_fs(shard.source, s3)
        with fs.open(shard.source, "rb") as f:
            table = pq.read_table(f, columns=[shard.column])
        values = table.column(shard.column).slice(shard.start, shard.stop - shard.start).to_pylist()
        return [_resolve(v.strip(), shard.base) for v in values if v and v.strip()]
    uris = []
    index = int(shard.column) if shard.kind == "csv" else None
    for n, line in enumerate(_range_lines(shard, s3)):
        if index is not None:
            if shard.start == 0 and n == 0:
                continue  # the header
            fields = next(csv.reader([line]), [])
            value = fields[index].strip() if index < len(fields) else ""
        else:
            value = line.strip()
            if value.startswith("#"):
                continue
        if value:
            uris.append(_resolve(value, shard.base))
    return uris


def expand_shard(shard: Shard, s3: S3Options | None = None) -> tuple[list[str], np.ndarray, int]:
    """A shard's URIs to label (each once in the whole input), their image ids, and how many of
    the shard's URIs were repeats (of an earlier shard's, marked by :func:`mark_repeats`, or of its own)."""
    listed = shard_uris_with_repeats(shard, s3)
    marked = _without_marked(shard, listed, s3)
    uris, ids, repeats = unique_uris(marked)
    return uris, ids, repeats + len(listed) - len(marked)


def unique_uris(uris: list[str]) -> tuple[list[str], np.ndarray, int]:
    """``uris`` without repeats (first kept), their image ids, and how many repeats were dropped."""
    ids = np.fromiter((image_id_for(redact(u)) for u in uris), dtype=np.int64, count=len(uris))
    _, first = np.unique(ids, return_index=True)
    first.sort()
    return [uris[i] for i in first], ids[first], len(uris) - len(first)


def probe_input(source: str, extensions: tuple[str, ...], s3: S3Options | None = None,
                max_listings: int = 20) -> None:
    """Cheap checks before Ray starts: the input exists and is reachable; a manifest is not empty;
    a folder/prefix holds an image within the first ``max_listings`` folder listings (a deeper
    tree is left to the listing tasks). Raises :class:`SourceError` (storage errors propagate)."""
    fs = fsspec_fs(source, s3)
    fs.invalidate_cache()
    if is_manifest(source):
        if not fs.exists(source):
            raise SourceError(f"manifest {redact(source)} does not exist")
        if source.lower().endswith(".parquet"):
            _parquet_shards(source, 1 << 30, s3)  # reads the footers: columns and row counts
            return
        first = _text_shards(source, 1 << 30, s3)[0]  # one shard: the first 64 KiB are enough
        head = Shard(first.shard_id, first.kind, first.source, 0, min(first.stop, 1 << 16), first.column)
        if not shard_uris(head, s3):
            raise SourceError(f"manifest {redact(source)} lists no URIs (in its first 64 KiB)")
        return
    if _has_glob(source):
        _glob_or_file(source, extensions, s3)
        return
    if _is_file(source, s3):
        return
    exts = tuple(e.lower() for e in extensions)
    frontier = [source]
    for _ in range(max_listings):
        if not frontier:
            raise SourceError(f"no image files ({', '.join(exts)}) found under {redact(source)}")
        subdirs = []
        for path, is_dir in _folder_entries(frontier.pop(0), s3):  # streamed: stops at the first image
            if is_dir:
                subdirs.append(path)
            elif path.lower().endswith(exts):
                return
        frontier.extend(sorted(subdirs))


def input_root(source: str) -> str | None:
    """The directory or prefix the images of ``--input`` lie under (what COCO ``file_name``s are
    relative to): the directory/prefix itself, a glob's fixed leading directories, a single file's
    directory; None for a manifest (its URIs may lie anywhere)."""
    from instseg_core.inputs import IMAGE_SUFFIXES

    if is_manifest(source):
        return None
    remote = is_remote(source)
    path = source if remote else os.path.abspath(source)
    if _has_glob(path):
        head = path[:min(path.index(ch) for ch in "*?[" if ch in path)]
        return head.rsplit("/", 1)[0] if "/" in head else head
    if (not remote and os.path.isfile(path)) or source.lower().endswith(IMAGE_SUFFIXES):
        return path.rsplit("/", 1)[0]
    return path.rstrip("/")
