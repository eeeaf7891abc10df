"""The job's COCO and LabelMe outputs, written from the parts by Ray tasks in parallel.

No process reads every part: each task takes a group of shards, and the ids it hands out come from
per-shard counts (:func:`pipelines.sinks.finish_shard`), so COCO ids are sequential ``1..N`` across
the whole run (exact in tools that read JSON numbers as doubles: browsers, CVAT, Label Studio;
the 63-bit ``image_id`` stays in Parquet, and each COCO image carries its ``uri``).

* ``layout="single"``: tasks write fragments under ``_merge/``; the driver streams them into one
  ``coco_results.json`` and one ``coco_dataset.json`` (a local temp file + rename, or one multipart
  upload on S3: a few MB of buffer, never the whole file in memory or on the head's disk).
* ``layout="sharded"``: tasks write complete files ``coco/dataset-<k>.json`` and
  ``coco/results-<k>.json`` (each loadable on its own; ids unique across all of them).
* ``"auto"``: single up to :data:`SINGLE_FILE_MAX_IMAGES` images, else sharded.

LabelMe files mirror the images' paths below the input root (``labelme/a/img.json``), so tasks
never need to agree on names. Label Studio tasks files are named by group and part
(``label_studio/tasks-<k>-<j>.json``); a run that produced only one is renamed ``tasks.json``
at the end (:mod:`pipelines.label_studio`).

While they stream their rows, the same tasks count what ``report.html`` shows
(:class:`pipelines.report.ReportStats`) and keep their best ``review_top`` images for the review
queue (:class:`pipelines.review.ReviewQueue`); the driver merges both, bounded in size.
"""

from __future__ import annotations

import io
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from instseg_core.io import S3Options, fsspec_fs, is_remote, join, write_bytes_atomic, write_uri
from pipelines.label_studio import (LABEL_STUDIO_DIR, LS_COLUMNS, LabelStudioOptions, finish_label_studio,
                                    write_task_files)
from pipelines.report import ReportStats
from pipelines.review import ReviewQueue
from pipelines.writers import (JSON_ENCODER, CategoryMap, coco_image_entry, coco_rle, f32, iter_rows, xywh,
                               write_labelme)
from pipelines.rows import STATUS_OK

log = logging.getLogger("instseg")

SINGLE_FILE_MAX_IMAGES = 200_000
WRITE_TASK_CPUS = 0.5  # a writer task mostly waits on storage; two share a CPU
MERGE_DIR = "_merge"
COCO_DIR = "coco"
_COLUMNS = ["image_id", "uri", "width", "height", "status", "error_kind", "instances"]
_SHARDS_PER_TASK = 16


@dataclass(frozen=True)
class Group:
    """Shards one task writes, and the first COCO ids it hands out."""

    index: int
    parts: list[str]
    first_image_id: int
    first_annotation_id: int


def plan_groups(shard_counts: list[dict[str, Any]], parts: dict[str, list[str]],
                shards_per_task: int = _SHARDS_PER_TASK) -> list[Group]:
    """Groups of shards in shard order with their first ids (prefix sums of the per-shard
    ``coco_images`` / ``coco_annotations`` counts)."""
    ordered = sorted((c for c in shard_counts if c["shard"] in parts), key=lambda c: c["shard"])
    groups, image_id, ann_id = [], 1, 1
    for k in range(0, len(ordered), shards_per_task):
        chunk = ordered[k:k + shards_per_task]
        groups.append(Group(len(groups), [p for c in chunk for p in sorted(parts[c["shard"]])], image_id, ann_id))
        image_id += sum(c["coco_images"] for c in chunk)
        ann_id += sum(c["coco_annotations"] for c in chunk)
    return groups


def _coco_header(categories: Sequence[str]) -> str:
    now = datetime.now(timezone.utc)
    info = {"description": "instseg predictions", "version": "1.0", "year": now.year,
            "date_created": now.isoformat(timespec="seconds")}
    return ('{"info":' + JSON_ENCODER.encode(info) + ',"licenses":[],"categories":'
            + JSON_ENCODER.encode(CategoryMap(categories).coco_categories()))


def write_group(output: str, group: Group, categories: Sequence[str], image_root: str | None, layout: str,
                labelme: bool, s3: S3Options | None,
                label_studio: LabelStudioOptions | None = None, review_top: int = 0,
                threshold: float = 0.5) -> dict[str, Any]:
    """One task: the COCO images, annotations and results of ``group`` (fragments, or complete
    files in the sharded layout), its LabelMe files and its Label Studio tasks files. Returns the
    counts written (and ``label_studio_files``: ``[(uri, tasks), ...]``; ``report``: its
    :class:`ReportStats`; ``review``: its best ``review_top`` queue entries at ``threshold``)."""
    cats = CategoryMap(categories)
    images, annotations, results = io.StringIO(), io.StringIO(), io.StringIO()
    image_id, ann_id = group.first_image_id, group.first_annotation_id
    n_images = n_anns = n_results = 0
    stats, queue = ReportStats(list(categories)), ReviewQueue(review_top, threshold)
    for part, row in ((p, r) for p in group.parts for r in iter_rows([p], _COLUMNS, s3=s3)):
        stats.add(row)
        queue.add_row(row, part)
        if row["status"] != STATUS_OK:
            continue
        images.write((",\n" if n_images else "") + JSON_ENCODER.encode(coco_image_entry(row, image_id, image_root)))
        n_images += 1
        for item in row["instances"] or []:
            category_id = cats.coco_id(item, row["uri"])
            box, score = xywh(item["bbox"]), f32(item["score"])
            results.write((",\n" if n_results else "") + JSON_ENCODER.encode(
                {"image_id": image_id, "category_id": category_id, "segmentation": coco_rle(item), "bbox": box,
                 "score": score}))
            n_results += 1
            if int(item["area"]) <= 0:
                continue  # an empty mask is no label
            annotations.write((",\n" if n_anns else "") + JSON_ENCODER.encode(
                {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": coco_rle(item),
                 "area": int(item["area"]), "bbox": box, "iscrowd": 0, "score": score}))
            ann_id += 1
            n_anns += 1
        image_id += 1
    name = f"{group.index:05d}"
    if layout == "sharded":
        dataset = (_coco_header(categories) + ',"annotations":[\n' + annotations.getvalue() + '\n],"images":[\n'
                   + images.getvalue() + "\n]}\n")
        write_bytes_atomic(join(output, COCO_DIR, f"dataset-{name}.json"), dataset.encode("utf-8"), s3)
        write_bytes_atomic(join(output, COCO_DIR, f"results-{name}.json"),
                           ("[\n" + results.getvalue() + "\n]\n").encode("utf-8"), s3)
    else:
        for kind, buf in (("images", images), ("annotations", annotations), ("results", results)):
            write_bytes_atomic(join(output, MERGE_DIR, f"{name}.{kind}"), buf.getvalue().encode("utf-8"), s3)
    if labelme:
        write_labelme(iter_rows(group.parts, _COLUMNS, s3=s3), join(output, "labelme"), image_root=image_root,
                      mirror=True, s3=s3)
    counts: dict[str, Any] = {"images": n_images, "annotations": n_anns, "results": n_results, "report": stats,
                              "review": queue.entries()}
    if label_studio is not None:
        counts["label_studio_files"] = write_task_files(
            iter_rows(group.parts, LS_COLUMNS, s3=s3), join(output, LABEL_STUDIO_DIR), f"tasks-{name}", categories,
            label_studio, s3=s3)
    return counts


def _stream(out_uri: str, pieces: list[tuple[str, list[str]]], s3: S3Options | None) -> None:
    """Write ``out_uri`` from literal text and fragment files, in order: ``pieces`` is a list of
    (text before, fragment URIs joined by commas). Copied 8 MiB at a time."""
    fs = fsspec_fs(out_uri, s3)

    def write(f) -> None:
        for text, fragments in pieces:
            f.write(text.encode("utf-8"))
            first = True
            for uri in fragments:
                if not fs.size(uri):
                    continue  # a group without ok images
                f.write(b"" if first else b",\n")
                first = False
                with fs.open(uri, "rb") as src:
                    shutil.copyfileobj(src, f, 8 << 20)

    write_uri(out_uri, write, s3)  # on S3 a multipart upload: the object appears when it completes


def write_outputs(output: str, shard_counts: list[dict[str, Any]], parts: dict[str, list[str]],
                  categories: Sequence[str], *, image_root: str | None, layout: str = "auto",
                  labelme: bool = False, label_studio: LabelStudioOptions | None = None,
                  s3: S3Options | None = None, shards_per_task: int = _SHARDS_PER_TASK, review_top: int = 0,
                  threshold: float = 0.5) -> dict[str, Any]:
    """Run :func:`write_group` over every group in Ray tasks (at most 16 in flight), then assemble
    the single files when asked. Returns ``{"layout", "images", "annotations", "results",
    "report": ReportStats, "review": [QueueEntry, ...] best-first}``, plus ``"label_studio":
    {"files", "tasks"}`` with ``label_studio`` options."""
    import ray

    total_images = sum(c["coco_images"] for c in shard_counts if c["shard"] in parts)
    if layout == "auto":
        layout = "single" if total_images <= SINGLE_FILE_MAX_IMAGES else "sharded"
    groups = plan_groups(shard_counts, parts, shards_per_task)
    task = ray.remote(num_cpus=WRITE_TASK_CPUS, max_retries=3)(write_group)
    totals = {"images": 0, "annotations": 0, "results": 0}
    stats, queue = ReportStats(list(categories)), ReviewQueue(review_top, threshold)
    ls_files: list[tuple[str, int]] = []
    pending: list = []
    todo = list(reversed(groups))
    while todo or pending:
        while todo and len(pending) < 16:
            pending.append(task.remote(output, todo.pop(), list(categories), image_root, layout, labelme, s3,
                                       label_studio, review_top, threshold))
        ready, pending = ray.wait(pending, num_returns=1)
        counts = ray.get(ready[0])
        ls_files += counts.pop("label_studio_files", [])
        stats.merge(counts.pop("report"))
        queue.merge(counts.pop("review"))
        for k, v in counts.items():
            totals[k] += v
    if layout == "single":
        frag = [f"{g.index:05d}" for g in groups]
        merge = join(output, MERGE_DIR)
        _stream(join(output, "coco_results.json"),
                [("[\n", [join(merge, f"{n}.results") for n in frag]), ("\n]\n", [])], s3)
        _stream(join(output, "coco_dataset.json"),
                [(_coco_header(categories) + ',"annotations":[\n', [join(merge, f"{n}.annotations") for n in frag]),
                 ('\n],"images":[\n', [join(merge, f"{n}.images") for n in frag]), ("\n]}\n", [])], s3)
        if is_remote(merge):
            fs = fsspec_fs(merge, s3)
            if fs.exists(merge):
                fs.rm(merge, recursive=True)
        else:
            shutil.rmtree(merge, ignore_errors=True)
    out: dict[str, Any] = {"layout": layout, **totals, "report": stats, "review": queue.ranked()}
    if label_studio is not None:
        out["label_studio"] = finish_label_studio(join(output, LABEL_STUDIO_DIR), sorted(ls_files), categories,
                                                  label_studio.kind, s3=s3)
    return out
