"""The review queue: the images a person should look at first, from the batch job's rows.

``--review-top K`` writes, under ``<output>/review/``:

* ``queue.csv``: the K images with the highest priority, best-first, columns
  ``uri,image_id,priority,reason`` (the measure: :mod:`instseg_core.review_score`);
* ``labelme/<path below the input root>.json``: their LabelMe files, to fix in LabelMe;
* ``label_studio/tasks.json`` + ``config.xml``: their Label Studio tasks (predictions included),
  in queue order, each task's ``data`` carrying ``review_rank``, ``review_priority`` and
  ``review_reason`` (columns the data manager can sort and filter by).

Scale: nothing holds more than K entries. Each merge task (:func:`pipelines.merge.write_group`,
one per group of shards) keeps a bounded heap of its best K while it streams its rows; the driver
merges the tasks' heaps into one of K as they finish. The rows of the K images (their masks) are
then read back from the part files named in the entries, :data:`READ_CHUNK` queue entries at a
time, so memory stays bounded by a chunk whatever K is. Error rows have no labels to review and
are left out (the report counts them). Only ok rows enter the queue, each image once.
"""

from __future__ import annotations

import csv
import heapq
import io
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from instseg_core.io import S3Options, fsspec_fs, join, write_bytes_atomic
from instseg_core.review_score import review_score
from pipelines.rows import STATUS_OK

log = logging.getLogger("instseg")

__all__ = ["QUEUE_COLUMNS", "QUEUE_FILE", "READ_CHUNK", "REVIEW_DIR", "QueueEntry", "ReviewQueue", "read_queue",
           "write_queue_csv", "write_review"]

REVIEW_DIR = "review"
QUEUE_FILE = "queue.csv"
QUEUE_COLUMNS = ("uri", "image_id", "priority", "reason")
READ_CHUNK = 500  # queue entries whose rows are read back (and held) at a time
_ROW_COLUMNS = ["image_id", "uri", "width", "height", "status", "instances", "run_id"]


@dataclass(frozen=True)
class QueueEntry:
    """One image in the queue, and the part file its row is in (to read its masks back)."""

    priority: float
    image_id: int
    uri: str
    reason: str
    part: str
    expected_errors: float = 0.0

    @property
    def key(self) -> tuple[float, float, int]:
        """Larger is reviewed earlier: higher priority, more expected errors, the smaller image id."""
        return self.priority, self.expected_errors, -self.image_id


class ReviewQueue:
    """The ``size`` highest-priority images seen so far (a bounded min-heap on :attr:`QueueEntry.key`)."""

    def __init__(self, size: int, threshold: float) -> None:
        if size < 0:
            raise ValueError(f"review queue size must be >= 0, got {size}")
        self.size = size
        self.threshold = threshold
        self._heap: list[tuple[tuple[float, float, int], QueueEntry]] = []
        self._ids: set[int] = set()

    def __len__(self) -> int:
        return len(self._heap)

    def add_row(self, row: Mapping[str, Any], part: str) -> None:
        """Score an output row (ok rows only; see the module doc) and keep it if it ranks."""
        if self.size == 0 or row["status"] != STATUS_OK:
            return
        score = review_score(row["instances"] or [], self.threshold)
        self.push(QueueEntry(score.priority, int(row["image_id"]), row["uri"], score.reason, part,
                             score.expected_errors))

    def push(self, entry: QueueEntry) -> None:
        if self.size == 0 or entry.image_id in self._ids:
            return  # a repeated row of an image (retried work) counts once
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, (entry.key, entry))
            self._ids.add(entry.image_id)
        elif entry.key > self._heap[0][0]:
            _, dropped = heapq.heapreplace(self._heap, (entry.key, entry))
            self._ids.discard(dropped.image_id)
            self._ids.add(entry.image_id)

    def merge(self, entries: Iterable[QueueEntry]) -> None:
        for entry in entries:
            self.push(entry)

    def entries(self) -> list[QueueEntry]:
        """The kept entries in no particular order (what a merge task hands back)."""
        return [e for _, e in self._heap]

    def ranked(self) -> list[QueueEntry]:
        """The kept entries, best-first."""
        return sorted(self.entries(), key=lambda e: e.key, reverse=True)


def write_queue_csv(entries: Sequence[QueueEntry], uri: str, s3: S3Options | None = None) -> None:
    """``queue.csv`` (header ``uri,image_id,priority,reason``), in the given order, atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(QUEUE_COLUMNS)
    for e in entries:
        w.writerow([e.uri, e.image_id, f"{e.priority:.4f}", e.reason])
    write_bytes_atomic(uri, buf.getvalue().encode("utf-8"), s3)


def read_queue(uri: str, s3: S3Options | None = None) -> list[dict[str, Any]]:
    """The rows of a ``queue.csv``, best-first (``image_id`` as int, ``priority`` as float)."""
    from instseg_core.io import read_uri

    rows = list(csv.DictReader(io.StringIO(read_uri(uri, s3).decode("utf-8"))))
    for r in rows:
        r["image_id"], r["priority"] = int(r["image_id"]), float(r["priority"])
    return rows


def _rows_in_order(entries: Sequence[QueueEntry], s3: S3Options | None) -> Iterator[dict[str, Any]]:
    """The output rows of ``entries``, in their order, :data:`READ_CHUNK` entries at a time."""
    from pipelines.writers import iter_rows

    for k in range(0, len(entries), READ_CHUNK):
        chunk = entries[k:k + READ_CHUNK]
        wanted = {e.image_id for e in chunk}
        found: dict[int, dict[str, Any]] = {}
        for part in sorted({e.part for e in chunk}):
            for row in iter_rows([part], _ROW_COLUMNS, s3=s3):
                iid = int(row["image_id"])
                if iid in wanted and iid not in found and row["status"] == STATUS_OK:
                    found[iid] = row
        missing = [e.uri for e in chunk if e.image_id not in found]
        if missing:  # a part replaced between ranking and reading (a concurrent rerun): say so, go on
            log.warning("review: %d queued image(s) no longer in their part files, e.g. %s", len(missing),
                        missing[:3])
        for rank, e in enumerate(chunk, start=k + 1):
            if e.image_id in found:
                yield {**found.pop(e.image_id), "_rank": rank, "_entry": e}


def _remove_tree(uri: str, s3: S3Options | None) -> None:
    fs = fsspec_fs(uri, s3)
    if fs.exists(uri):
        fs.rm(uri, recursive=True)


def write_review(output: str, ranked: Sequence[QueueEntry], categories: Sequence[str], *,
                 image_root: str | None, label_studio: Any | None = None,
                 s3: S3Options | None = None) -> dict[str, Any]:
    """Write ``review/queue.csv``, the LabelMe files and the Label Studio tasks of ``ranked``
    (best-first). ``label_studio``: :class:`pipelines.label_studio.LabelStudioOptions` (defaults
    when None). Files of an earlier queue are replaced. Returns what was written."""
    from instseg_core.label_studio import labeling_config, task
    from pipelines.label_studio import CONFIG_NAME, TASKS_NAME, LabelStudioOptions
    from pipelines.writers import JSON_ENCODER, CategoryMap, _staged_text, write_labelme

    root = join(output, REVIEW_DIR)
    write_queue_csv(ranked, join(root, QUEUE_FILE), s3)
    labelme_dir, ls_dir = join(root, "labelme"), join(root, "label_studio")
    for old in (labelme_dir, ls_dir):
        _remove_tree(old, s3)  # images of an earlier queue must not linger among this one's
    n_labelme = write_labelme(_rows_in_order(ranked, s3), labelme_dir, image_root=image_root, mirror=True, s3=s3)
    options = label_studio or LabelStudioOptions()
    cats = CategoryMap(categories)
    n_tasks = 0
    with _staged_text(join(ls_dir, TASKS_NAME), s3) as (f, _):
        f.write("[")
        for row in _rows_in_order(ranked, s3):
            for item in row["instances"] or []:
                cats.coco_id(item, row["uri"])  # rows of another model are refused, as by every writer
            entry: QueueEntry = row["_entry"]
            t = task(row["uri"], int(row["width"]), int(row["height"]), row["instances"] or [], categories,
                     model_version=row.get("run_id") or options.model_version, kind=options.kind,
                     min_score=options.min_score, local_files_root=options.local_files_root,
                     data={"review_rank": row["_rank"], "review_priority": entry.priority,
                           "review_reason": entry.reason})
            f.write(("\n" if n_tasks == 0 else ",\n") + JSON_ENCODER.encode(t))
            n_tasks += 1
        f.write("\n]\n")
    write_bytes_atomic(join(ls_dir, CONFIG_NAME), labeling_config(categories, options.kind).encode("utf-8"), s3)
    return {"queue": join(REVIEW_DIR, QUEUE_FILE), "images": len(ranked), "labelme_files": n_labelme,
            "label_studio_tasks": n_tasks}
