"""Label Studio files from the batch job's rows: ``label_studio/tasks.json`` (tasks with
predictions, :mod:`instseg_core.label_studio`) and ``label_studio/config.xml`` (their labeling
config).

**File size.** Label Studio imports a JSON list of tasks, but an upload (the import dialog, or
``POST /api/projects/<id>/import``) is capped by the server's ``DATA_UPLOAD_MAX_MEMORY_SIZE``
(250 MB by default) and parsed in one request. Brush masks are large (a few to tens of KB per
instance), so tasks are written in files of at most :data:`MAX_TASKS_PER_FILE` tasks and about
:data:`MAX_BYTES_PER_FILE` bytes: a run that fits in one file gets ``label_studio/tasks.json``,
a larger one ``label_studio/tasks-<group>-<part>.json`` (each a complete list; import them one by
one, or sync the folder as a cloud/Local Files storage in "Tasks" mode, which reads each file as
a list of tasks).

Files are streamed (one task in memory at a time) and published atomically, locally or on S3.
"""

from __future__ import annotations

import json
import posixpath
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO, Any, Iterable, Sequence

from instseg_core.io import S3Options, fsspec_fs, join, open_uri, write_bytes_atomic
from instseg_core.label_studio import KINDS, labeling_config, task
from pipelines.rows import STATUS_OK
from pipelines.writers import JSON_ENCODER, CategoryMap, _staged_text, iter_rows

__all__ = ["CONFIG_NAME", "LABEL_STUDIO_DIR", "LS_COLUMNS", "MAX_BYTES_PER_FILE", "MAX_TASKS_PER_FILE", "TASKS_NAME",
           "LabelStudioOptions", "OutputError", "convert_output", "finish_label_studio", "output_labels",
           "write_label_studio", "write_task_files", "write_tasks"]

LABEL_STUDIO_DIR = "label_studio"
TASKS_NAME = "tasks.json"
CONFIG_NAME = "config.xml"
#: Tasks per file: one import request each (Label Studio creates them in one transaction).
MAX_TASKS_PER_FILE = 10_000
#: A file is closed once it holds this many bytes: well under the server's default 250 MB upload cap.
MAX_BYTES_PER_FILE = 100 << 20
#: The row columns the writer reads (``run_id``: each prediction's ``model_version``).
LS_COLUMNS = ["image_id", "uri", "width", "height", "status", "instances", "run_id"]


@dataclass(frozen=True)
class LabelStudioOptions:
    """How tasks are written.

    ``kind``: ``"brush"`` (masks as brush RLE, default) or ``"polygon"``.
    ``local_files_root``: Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT`` (local images become
    ``/data/local-files/?d=<path below it>``; default ``/``, the server's own default).
    ``min_score``: instances below it are left out. ``model_version``: for rows without a
    ``run_id`` (each prediction's ``model_version`` is its row's run id)."""

    kind: str = "brush"
    local_files_root: str = "/"
    min_score: float = 0.0
    model_version: str = ""
    max_tasks_per_file: int = MAX_TASKS_PER_FILE
    max_bytes_per_file: int = MAX_BYTES_PER_FILE

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Label Studio format must be one of {KINDS}, got {self.kind!r}")
        if self.max_tasks_per_file < 1 or self.max_bytes_per_file < 1:
            raise ValueError("max_tasks_per_file and max_bytes_per_file must be positive")


def _tasks(rows: Iterable[dict[str, Any]], categories: Sequence[str],
           options: LabelStudioOptions) -> Iterable[dict[str, Any]]:
    """One task per ok row, each image once."""
    cats = CategoryMap(categories)
    seen: set[int] = set()
    for row in rows:
        if row["status"] != STATUS_OK or int(row["image_id"]) in seen:
            continue
        seen.add(int(row["image_id"]))
        instances = row["instances"] or []
        for item in instances:
            cats.coco_id(item, row["uri"])  # rows of another model are refused, as by the COCO writers
        yield task(row["uri"], int(row["width"]), int(row["height"]), instances, categories,
                   model_version=row.get("run_id") or options.model_version, kind=options.kind,
                   min_score=options.min_score, local_files_root=options.local_files_root)


class _TaskFile:
    """One tasks file being written: ``[task,\\ntask,...]``, counting tasks and bytes."""

    def __init__(self, f: IO[str]) -> None:
        self.f, self.tasks, self.bytes = f, 0, 1
        f.write("[")

    def append(self, text: str) -> None:
        sep = ",\n" if self.tasks else "\n"
        self.f.write(sep + text)
        self.tasks += 1
        self.bytes += len(sep) + len(text)  # characters: a non-ASCII label or path makes a few more bytes

    def close(self) -> None:
        self.f.write("\n]\n")


def write_tasks(rows: Iterable[dict[str, Any]], out_uri: str, categories: Sequence[str],
                options: LabelStudioOptions = LabelStudioOptions(), *, s3: S3Options | None = None) -> int:
    """Write every task of ``rows`` into one file ``out_uri`` (no size limit); returns the task count.
    For a handful of images (a review sample); :func:`write_task_files` splits large outputs."""
    with _staged_text(out_uri, s3) as (f, _):
        out = _TaskFile(f)
        for t in _tasks(rows, categories, options):
            out.append(JSON_ENCODER.encode(t))
        out.close()
    return out.tasks


def write_task_files(rows: Iterable[dict[str, Any]], out_dir: str, prefix: str, categories: Sequence[str],
                     options: LabelStudioOptions = LabelStudioOptions(), *,
                     s3: S3Options | None = None) -> list[tuple[str, int]]:
    """Write the tasks of ``rows`` into ``<out_dir>/<prefix>-000.json``, ``-001``, ... of at most
    ``options.max_tasks_per_file`` tasks and about ``options.max_bytes_per_file`` bytes each (a file
    is closed after the task that crosses the limit). Returns ``[(uri, tasks), ...]``; no file for
    rows without ok images."""
    written: list[tuple[str, int]] = []
    with ExitStack() as stack:
        current: _TaskFile | None = None
        uri = ""

        def close() -> None:
            nonlocal current
            if current is not None:
                current.close()
                stack.close()  # publishes the file
                written.append((uri, current.tasks))
                current = None

        for t in _tasks(rows, categories, options):
            if current is None:
                uri = join(out_dir, f"{prefix}-{len(written):03d}.json")
                f, _ = stack.enter_context(_staged_text(uri, s3))
                current = _TaskFile(f)
            current.append(JSON_ENCODER.encode(t))
            if current.tasks >= options.max_tasks_per_file or current.bytes >= options.max_bytes_per_file:
                close()
        close()
    return written


def finish_label_studio(out_dir: str, written: Sequence[tuple[str, int]], categories: Sequence[str],
                        kind: str = "brush", *, s3: S3Options | None = None) -> dict[str, Any]:
    """After every tasks file of a run is written: write ``config.xml``, name a lone tasks file
    ``tasks.json`` (an empty list when no image was labelled), and remove tasks files of earlier
    runs that this run did not write. Returns ``{"files": [names], "tasks": n}``."""
    fs = fsspec_fs(out_dir, s3)
    write_bytes_atomic(join(out_dir, CONFIG_NAME), labeling_config(categories, kind).encode("utf-8"), s3)
    names = [posixpath.basename(uri) for uri, _ in written]
    if len(written) == 1:
        fs.mv(written[0][0], join(out_dir, TASKS_NAME))  # a rename locally; copy + delete on S3
        names = [TASKS_NAME]
    elif not written:
        write_bytes_atomic(join(out_dir, TASKS_NAME), b"[]\n", s3)
        names = [TASKS_NAME]
    keep = set(names)
    if fs.exists(out_dir):
        for path in fs.ls(out_dir, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if name.startswith("tasks") and name.endswith(".json") and name not in keep:
                fs.rm(path)  # a file of an earlier, differently split run
    return {"files": names, "tasks": sum(n for _, n in written)}


def write_label_studio(rows: Iterable[dict[str, Any]], out_dir: str, categories: Sequence[str],
                       options: LabelStudioOptions = LabelStudioOptions(), *,
                       s3: S3Options | None = None) -> dict[str, Any]:
    """Every Label Studio file of ``rows`` into ``out_dir`` in this process: split tasks files
    (:func:`write_task_files`), then :func:`finish_label_studio`."""
    written = write_task_files(rows, out_dir, "tasks-00000", categories, options, s3=s3)
    return finish_label_studio(out_dir, written, categories, options.kind, s3=s3)


# ---------------------------------------------------------------------- from an existing output


class OutputError(ValueError):
    """An output directory the converter cannot read (the message is one line for the user)."""


_SHARDS_PER_FILE_GROUP = 16  # as the batch job's merge groups: one tasks-<k>-*.json series per 16 shards
_HEAD_BYTES = 4 << 20
_WRITE_TASK_CPUS = 0.5  # as the merge's writer tasks: mostly reading and writing storage


def output_labels(output: str, s3: S3Options | None = None) -> list[str]:
    """The model's label list of a batch job output, from its COCO dataset file's ``categories``
    (``coco_dataset.json``, else ``coco/dataset-00000.json``). The job writes categories before
    the annotations, so only the file's head is read."""
    fs = fsspec_fs(output, s3)
    for name in ("coco_dataset.json", "coco/dataset-00000.json"):
        uri = join(output, name)
        if not fs.exists(uri):
            continue
        with open_uri(uri, "rb", s3) as f:
            head = f.read(_HEAD_BYTES).decode("utf-8", errors="replace")
        end = head.find(',"annotations":[')
        try:
            cats = json.loads(head[:end] + "}")["categories"] if end >= 0 else json.loads(head)["categories"]
        except (ValueError, KeyError) as e:
            raise OutputError(f"{uri}: no readable categories at its start ({e})") from None
        ids = sorted(int(c["id"]) for c in cats)
        if ids != list(range(1, len(ids) + 1)):
            raise OutputError(f"{uri}: category ids {ids[:5]}... are not 1..N as the batch job writes them")
        return [c["name"] for c in sorted(cats, key=lambda c: int(c["id"]))]
    raise OutputError(f"{output} has no coco_dataset.json or coco/dataset-00000.json (where the label list is "
                      "read from): run the batch job to its end first")


def _group_files(parts: list[str], out_dir: str, prefix: str, categories: Sequence[str],
                 options: LabelStudioOptions, s3: S3Options | None) -> list[tuple[str, int]]:
    return write_task_files(iter_rows(parts, LS_COLUMNS, s3=s3), out_dir, prefix, categories, options, s3=s3)


def convert_output(output: str, out_dir: str, options: LabelStudioOptions, *, s3: S3Options | None = None,
                   categories: Sequence[str] | None = None, use_ray: bool | None = None) -> dict[str, Any]:
    """The Label Studio files of an existing batch job output (its Parquet parts), into ``out_dir``
    (usually ``<output>/label_studio``): the same files ``--label-studio`` writes.

    Parts are taken 16 shards at a time, as the job's merge groups them; with more than one group
    (``use_ray=None``), or ``use_ray=True``, the groups are written by Ray tasks (the caller
    connects Ray). ``categories`` defaults to :func:`output_labels`."""
    from pipelines.sinks import list_parts, parts_by_shard

    by_shard = parts_by_shard(list_parts(output, s3))
    if not by_shard:
        raise OutputError(f"{output} has no Parquet parts (parts/part-*.parquet): not a batch job output")
    categories = list(categories) if categories is not None else output_labels(output, s3)
    shards = sorted(by_shard)
    groups = [[p for sh in shards[k:k + _SHARDS_PER_FILE_GROUP] for p in sorted(by_shard[sh])]
              for k in range(0, len(shards), _SHARDS_PER_FILE_GROUP)]
    args = [(parts, out_dir, f"tasks-{k:05d}", categories, options, s3) for k, parts in enumerate(groups)]
    written: list[tuple[str, int]] = []
    if use_ray if use_ray is not None else len(groups) > 1:
        import ray

        task = ray.remote(num_cpus=_WRITE_TASK_CPUS, max_retries=3)(_group_files)
        for files in ray.get([task.remote(*a) for a in args]):
            written += files
    else:
        for a in args:
            written += _group_files(*a)
    return finish_label_studio(out_dir, sorted(written), categories, options.kind, s3=s3)
