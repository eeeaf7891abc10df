"""Writers of the pipeline's Parquet rows (:data:`pipelines.rows.ROW_SCHEMA`) in review/training formats.

* :func:`write_coco_results` - COCO *results* (detections) list, what ``COCO.loadRes`` / ``COCOeval`` take.
* :func:`write_coco_dataset` - a COCO *dataset* (predictions as labels), loadable by ``pycocotools.coco.COCO``.
* :func:`write_labelme`      - one LabelMe 5.2.1 JSON per image, polygons traced from the masks.

Conventions shared by every writer:

* **Category ids**: COCO ``category_id = class_id + 1``. COCO ids start at 1 (0 is commonly read as
  "background"), while ``class_id`` indexes the model's label list from 0. The ``categories``
  argument must be that label list, in the model's order: ``categories[k]`` gets COCO id ``k + 1``.
  A row whose ``class_id`` is out of range, or whose ``label`` differs from ``categories[class_id]``
  (rows of another model), raises ``ValueError`` and nothing is published.
* **Image ids**: COCO ``image_id`` is the row's ``image_id`` (:func:`pipelines.rows.image_id_for`, a stable
  63-bit hash of the URI), so results and dataset files of the same rows join on it. Caveat: tools that
  parse JSON into IEEE doubles (JavaScript) lose precision above 2**53; Python tools are exact.
* **Which rows**: only ``status == "ok"`` rows, and each image once: the first ok row seen per
  ``image_id`` wins (duplicates come from retried work after failures). An image that failed in one
  row and succeeded in a later one is therefore exported.
* **Boxes**: rows hold ``[x1, y1, x2, y2]``; COCO gets ``[x, y, w, h]``. Floats are written in the
  shortest form that round-trips their float32 value (the precision the rows store).
* **Masks**: COCO ``segmentation`` is the row's compressed RLE ``{"size": [h, w], "counts": str}``.
* **Streaming and atomic publish**: rows are consumed once, one at a time (feed :func:`iter_rows`,
  which reads part files batch by batch); JSON text is written incrementally to a temp file and
  published whole: ``os.replace`` next to the target locally, one upload of the finished file to
  object stores (``fs.put_file``: a single PUT, or a multipart upload that only creates the object when
  it completes). A failure mid-way leaves any previous file under the final name untouched and no
  temp file behind. Memory is O(number of images) only for the de-duplication set of int64 ids
  (plus file stems for LabelMe).

Remote URIs (``s3://...``) go through fsspec; S3 settings are the ``s3`` argument, else
:class:`instseg_core.io.S3Options` from the standard AWS environment variables.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import fsspec
import numpy as np
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from instseg_core.io import S3Options, atomic_open, atomic_write, is_remote, open_uri, url_to_fs
from instseg_core.masks import decode_rle, mask_to_polygons
from pipelines.rows import STATUS_OK

__all__ = ["EXPORT_COLUMNS", "LABELME_VERSION", "coco_file_name", "coco_image_entry", "iter_rows", "write_coco_results",
           "write_coco_dataset", "write_labelme"]

#: The columns the writers read; pass to :func:`iter_rows` to skip the others (errors, run ids).
EXPORT_COLUMNS = ["image_id", "uri", "width", "height", "status", "instances"]
LABELME_VERSION = "5.2.1"

JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))  # NaN is not JSON
_REMOTE_PUT_BATCH = 64  # LabelMe files uploaded concurrently per fs.pipe call


# ---------------------------------------------------------------------- reading


def iter_rows(part_uris: Iterable[str], columns: list[str] | None = None, *,
              batch_size: int = 1024, s3: S3Options | None = None) -> Iterator[dict[str, Any]]:
    """Rows of Parquet part files (local paths or fsspec URIs) as dicts, file by file, batch by batch.

    Only one record batch (``batch_size`` rows) is materialised as Python objects at a time, so
    millions of rows stream in bounded memory. ``columns`` restricts what is read
    (:data:`EXPORT_COLUMNS` is all the writers need).
    """
    for uri in part_uris:
        with open_uri(uri, "rb", s3) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                yield from batch.to_pylist()


def _unique_ok_rows(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Ok rows, each image once (the first row seen per image_id)."""
    seen: set[int] = set()
    for row in rows:
        if row["status"] != STATUS_OK:
            continue
        image_id = int(row["image_id"])
        if image_id in seen:
            continue
        seen.add(image_id)
        yield row


# ---------------------------------------------------------------------- conversions


def f32(value: float) -> float:
    """``value`` at float32 precision, in its shortest decimal form (0.87, not 0.8700000047683716)."""
    return float(str(np.float32(value)))


def xywh(bbox: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return [f32(x1), f32(y1), f32(x2 - x1), f32(y2 - y1)]


def coco_rle(item: Mapping[str, Any]) -> dict[str, Any]:
    rle = item["rle"]
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]}


class CategoryMap:
    """class_id -> COCO category_id, checking each class once against the model's label list."""

    def __init__(self, categories: Sequence[str], category_ids: Sequence[int] | None = None) -> None:
        if len(categories) == 0:
            raise ValueError("categories must be the model's label list (non-empty)")
        if category_ids is not None and len(category_ids) != len(categories):
            raise ValueError(f"{len(category_ids)} category ids for {len(categories)} labels")
        self.categories = list(categories)
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        self._checked: set[int] = set()

    def coco_id(self, item: Mapping[str, Any], uri: str) -> int:
        cid = int(item["class_id"])
        if cid not in self._checked:
            if not 0 <= cid < len(self.categories):
                raise ValueError(f"{uri}: class_id {cid} is outside categories ({len(self.categories)} labels); "
                                 "pass the label list of the model that produced the rows")
            label = item.get("label")
            if label is not None and label != self.categories[cid]:
                raise ValueError(f"{uri}: class_id {cid} is labelled {label!r} in the rows but "
                                 f"{self.categories[cid]!r} in categories; pass the model's label list")
            self._checked.add(cid)
        return cid + 1 if self.category_ids is None else self.category_ids[cid]

    def coco_categories(self) -> list[dict[str, Any]]:
        return [{"id": k + 1, "name": name, "supercategory": ""} for k, name in enumerate(self.categories)]


def _basename(uri: str) -> str:
    """The file name of a path or URI (query and fragment of http(s) URLs dropped)."""
    path = urlsplit(uri).path if uri.startswith(("http://", "https://")) else uri
    return posixpath.basename(path.replace("\\", "/").rstrip("/"))


# ---------------------------------------------------------------------- atomic publish


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@contextmanager
def _staged_text(out_uri: str, s3: S3Options | None = None) -> Iterator[tuple[IO[str], str]]:
    """A text file to write the whole output into, published under ``out_uri`` only on success.

    Yields ``(file, staging_dir)``; ``staging_dir`` is where extra spool files should go (next to
    the output for local targets: same disk that must hold the result anyway).
    """
    fs, path = url_to_fs(out_uri, s3)
    if _is_local(fs):
        path = os.path.abspath(path)
        with atomic_open(path) as raw:
            f = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
            try:
                yield f, os.path.dirname(path)
            finally:
                f.detach()  # flushes; atomic_open closes and publishes the file itself
        return
    staging_dir = tempfile.gettempdir()
    # keep the final name as suffix: s3fs guesses the object's Content-Type from it
    tmp = os.path.join(staging_dir, f".{uuid.uuid4().hex}.{posixpath.basename(path)}")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            yield f, staging_dir
        fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _JsonArray:
    """Writes ``[item,\\nitem,...]`` item by item (one line per item: greppable, diff-friendly)."""

    def __init__(self, f: IO[str]) -> None:
        self.f = f
        self.count = 0

    def append(self, item: Any) -> None:
        self.f.write(",\n" if self.count else "\n")
        self.f.write(JSON_ENCODER.encode(item))
        self.count += 1


# ---------------------------------------------------------------------- COCO


def write_coco_results(rows: Iterable[dict[str, Any]], out_uri: str, categories: Sequence[str], *,
                       category_ids: Sequence[int] | None = None,
                       image_ids: Callable[[Mapping[str, Any]], Sequence[int]] | None = None,
                       s3: S3Options | None = None) -> int:
    """Write the COCO results JSON (a list of detections) of ``rows`` to ``out_uri``; returns their number.

    Each detection is ``{"image_id", "category_id", "segmentation" (RLE), "bbox" [x, y, w, h],
    "score"}``. Every instance of every ok image is kept (no score threshold, empty masks included):
    this is the faithful dump ``COCOeval`` should judge.

    To score against an existing dataset, ``category_ids[class_id]`` replaces ``class_id + 1`` and
    ``image_ids(row)`` replaces the row's ``image_id`` (the ids the row's image has in that dataset;
    its detections are written once per id, none for an empty list).
    """
    cats = CategoryMap(categories, category_ids)
    with _staged_text(out_uri, s3) as (f, _):
        f.write("[")
        arr = _JsonArray(f)
        for row in _unique_ok_rows(rows):
            for image_id in ([int(row["image_id"])] if image_ids is None else image_ids(row)):
                for item in row["instances"] or []:
                    arr.append({"image_id": image_id, "category_id": cats.coco_id(item, row["uri"]),
                                "segmentation": coco_rle(item), "bbox": xywh(item["bbox"]),
                                "score": f32(item["score"])})
        f.write("\n]\n")
    return arr.count


def coco_file_name(uri: str, image_root: str | None = None) -> str:
    """The COCO ``file_name`` of an image: its path relative to ``image_root`` (the job's input
    directory or prefix) when it lies under it, else its location without the scheme
    (``bucket/key``, ``host/path``, a local path without its leading ``/``). Either way two images
    never share a name, unlike basenames (``a/img.jpg`` and ``b/img.jpg``)."""
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        location = parts.netloc.rpartition("@")[2] + parts.path  # never a user:password@ part
    else:
        location = uri.split("://", 1)[1] if "://" in uri else uri
    if image_root:
        root = image_root.split("://", 1)[1] if "://" in image_root else image_root
        root = root.rstrip("/") + "/"
        if location.startswith(root):
            return location[len(root):]
    return location.lstrip("/")


def coco_image_entry(row: Mapping[str, Any], image_id: int, image_root: str | None) -> dict[str, Any]:
    """The COCO ``images`` entry of an ok row under ``image_id``."""
    uri = row["uri"]
    entry: dict[str, Any] = {"id": image_id,
                             "file_name": coco_file_name(uri, image_root) or str(row["image_id"]),
                             "width": int(row["width"]), "height": int(row["height"]), "uri": uri}
    if uri.startswith(("http://", "https://")):
        entry["coco_url"] = uri  # COCO's field for a downloadable address
    return entry


def write_coco_dataset(rows: Iterable[dict[str, Any]], out_uri: str, categories: Sequence[str], *,
                       min_score: float = 0.0, info: Mapping[str, Any] | None = None,
                       image_root: str | None = None, s3: S3Options | None = None) -> dict[str, int]:
    """Write a COCO dataset JSON whose annotations are the predictions in ``rows``.

    Layout: ``{"info", "licenses": [], "categories", "annotations", "images"}`` (key order is
    irrelevant to COCO readers; annotations stream straight into the output while the smaller
    images list is spooled and appended).

    * ``images``: one per ok image, ``{"id", "file_name", "width", "height", "uri"}``;
      ``file_name`` is the path relative to ``image_root`` (:func:`coco_file_name`: unique, so
      ``a/img.jpg`` and ``b/img.jpg`` stay apart), ``uri`` the image's full path/URI (not a COCO
      field; readers ignore unknown keys); http(s) images also get ``coco_url``.
      Images without annotations are kept (negatives).
    * ``categories``: ``{"id": class_id + 1, "name", "supercategory": ""}`` for the whole label list.
    * ``annotations``: instances with ``score >= min_score`` and a non-empty mask (an empty mask
      is no label), ids ``1..N`` in output order, ``{"id", "image_id", "category_id", "segmentation"
      (RLE), "area" (mask pixels), "bbox" [x, y, w, h], "iscrowd": 0, "score"}``.

    ``info`` entries override the generated ``info`` fields. Returns ``{"images": n, "annotations": m}``.
    """
    cats = CategoryMap(categories)
    now = datetime.now(timezone.utc)
    head = {"description": "instseg predictions", "version": "1.0", "year": now.year,
            "date_created": now.isoformat(timespec="seconds")}
    head.update(info or {})
    with _staged_text(out_uri, s3) as (f, staging_dir), \
            tempfile.TemporaryFile("w+", encoding="utf-8", dir=staging_dir) as images_spool:
        f.write('{"info":' + JSON_ENCODER.encode(head) + ',"licenses":[],"categories":'
                + JSON_ENCODER.encode(cats.coco_categories()) + ',"annotations":[')
        anns = _JsonArray(f)
        images = _JsonArray(images_spool)
        for row in _unique_ok_rows(rows):
            image_id = int(row["image_id"])
            images.append(coco_image_entry(row, image_id, image_root))
            for item in row["instances"] or []:
                category_id = cats.coco_id(item, row["uri"])  # checked even when filtered out
                if float(item["score"]) < min_score or int(item["area"]) <= 0:
                    continue
                anns.append({"id": anns.count + 1, "image_id": image_id, "category_id": category_id,
                             "segmentation": coco_rle(item), "area": int(item["area"]),
                             "bbox": xywh(item["bbox"]), "iscrowd": 0, "score": f32(item["score"])})
        f.write('\n],"images":[')
        images_spool.seek(0)
        shutil.copyfileobj(images_spool, f)
        f.write("\n]}\n")
    return {"images": images.count, "annotations": anns.count}


# ---------------------------------------------------------------------- LabelMe


def _labelme_shapes(row: Mapping[str, Any], min_score: float) -> list[dict[str, Any]]:
    """Polygon shapes of one row; the parts of one multi-part mask share a group_id.

    Outer contours only: a polygon cannot express holes, so LabelMe shows holes filled.
    """
    shapes: list[dict[str, Any]] = []
    next_group = 1
    for item in row["instances"] or []:
        score = float(item["score"])
        if score < min_score or int(item["area"]) <= 0:
            continue
        mask = decode_rle([coco_rle(item)])[0]  # one mask at a time: [N, H, W] of a crowded image is large
        polygons = mask_to_polygons(mask, min_points=3)
        if not polygons:
            continue  # slivers too thin for a polygon
        group_id = None
        if len(polygons) > 1:  # LabelMe joins shapes of one object by a shared group_id
            group_id, next_group = next_group, next_group + 1
        label = item.get("label") or str(item["class_id"])
        for flat in polygons:
            shapes.append({"label": label, "points": [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)],
                           "group_id": group_id, "description": f"score={score:.2f}",
                           "shape_type": "polygon", "flags": {}})
    return shapes


def _labelme_image_path(uri: str, out_dir: str | None) -> str:
    """LabelMe resolves imagePath relative to the JSON file: relative when both are local, else the URI."""
    if out_dir is not None and not is_remote(uri):
        local = os.path.abspath(uri.removeprefix("file://"))
        try:
            return os.path.relpath(local, out_dir).replace(os.sep, "/")
        except ValueError:  # another drive (Windows)
            return local
    return uri


def write_labelme(rows: Iterable[dict[str, Any]], out_dir_uri: str, *, min_score: float = 0.0,
                  image_root: str | None = None, mirror: bool = False, s3: S3Options | None = None) -> int:
    """Write one LabelMe JSON per ok image into ``out_dir_uri``; returns the number of files.

    Files are named ``<image stem>.json``; when a stem was already used (same name in another
    directory; compared case-insensitively for case-insensitive file systems) ``_<image_id>`` is
    appended. With ``mirror=True`` a file mirrors the image's path below ``image_root`` instead
    (``a/img.jpg`` -> ``a/img.json``, :func:`coco_file_name`): unique without remembering earlier
    names, so separate processes can write parts of one folder. Each file holds polygons traced from the masks with ``score >= min_score``
    (``description`` carries the score); ``imagePath`` is relative to the output dir when image and
    output are both local, the image URI otherwise; ``imageData`` is null (LabelMe loads the image).
    Images without instances get a file with no shapes.

    Each file is published atomically (local temp file + ``os.replace``; one PUT per object,
    uploaded in concurrent batches, on object stores). A failure mid-way leaves the files already
    written (each complete).
    """
    fs, root = url_to_fs(out_dir_uri, s3)
    local = _is_local(fs)
    if local:
        root = os.path.abspath(root)
        os.makedirs(root, exist_ok=True)
    root = root.rstrip("/") or "/"
    used: set[str] = set()
    pending: dict[str, bytes] = {}
    count = 0

    def flush() -> None:
        if pending:
            fs.pipe(dict(pending))  # s3fs uploads these concurrently, each as one put_object
            pending.clear()

    for row in _unique_ok_rows(rows):
        uri, image_id = row["uri"], int(row["image_id"])
        if mirror:
            name = posixpath.splitext(coco_file_name(uri, image_root))[0] or str(image_id)
        else:
            stem = posixpath.splitext(_basename(uri))[0] or str(image_id)
            name = stem
            while name.casefold() in used:  # loops only if "<stem>_<id>" itself was an earlier stem
                name = f"{name}_{image_id}"
            used.add(name.casefold())
        folder = posixpath.dirname(f"{root}/{name}") if local else None
        doc = {"version": LABELME_VERSION, "flags": {}, "shapes": _labelme_shapes(row, min_score),
               "imagePath": _labelme_image_path(uri, folder), "imageData": None,
               "imageHeight": int(row["height"]), "imageWidth": int(row["width"])}
        data = JSON_ENCODER.encode(doc).encode("utf-8")  # compact: indent= would use json's ~10x slower Python encoder
        if local:
            path = os.path.join(root, name + ".json")
            atomic_write(path, lambda f: f.write(data))
        else:
            pending[f"{root}/{name}.json"] = data
            if len(pending) >= _REMOTE_PUT_BATCH:
                flush()
        count += 1
    flush()
    return count
