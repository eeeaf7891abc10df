"""Checking a COCO instance-segmentation dataset in PaddleX's layout (``COCOInstSegDataset``).

:func:`check_dataset` writes what PaddleX's dataset checker writes:

* ``<output_dir>/check_dataset_result.json``: PaddleX's keys (``done_flag``, ``check_pass``,
  ``attributes``, ``analysis``, ``dataset_path``, ``show_type``, ``dataset_type``) plus
  ``deep_check``, the summary of the deeper checks below (:func:`summarize_problems`);
* ``<output_dir>/check_dataset/demo_img/<file_name>``: sample images with masks, boxes and
  category names drawn (:mod:`instseg_core.datasets.demo`);
* ``<output_dir>/check_dataset/histogram.png``: annotations per category, train vs val.

As in PaddleX, ``num_classes`` counts the **val** file's category ids and ``train_samples`` /
``val_samples`` count **annotations**, not images. On a fatal error (:class:`DatasetError`: no or
several ``images`` directories, missing or unparsable annotation file) the result file holds
``{"done_flag": false, "err_type", "err_msg"}`` and the error is re-raised.

Deliberate differences from PaddleX:

* Up to ``sample_num`` images are drawn from **each** split (PaddleX reuses one counter, so val
  gets fewer samples than asked when train has fewer images than ``sample_num``).
* A missing or broken image is reported as a problem instead of aborting the whole check.
* Standard JSON (``json``, indent 2): ``/`` is not escaped as ``\\/`` as ujson does.
* Demo images are drawn by :func:`instseg_core.visualize.draw_annotations` in PaddleX's checker
  look, with the differences listed there (masks under the labels, so the labels stay readable;
  box lines at least 1 px; Pillow's default font).
* ``check_pass`` is false as soon as a deeper check finds an error-level problem (PaddleX only
  validates that the files exist and load).

Deeper checks, by kind (``KIND_LEVELS``). Errors break training or evaluation, or silently
corrupt labels; warnings are tolerated by training (PaddleDetection clips or drops such boxes),
but are probably annotation mistakes:

===========================  =======  ===================================================
kind                         level    meaning
===========================  =======  ===================================================
missing_fields               error    a required key is absent or malformed (wrong type,
                                      odd-length polygon...). Required: top-level
                                      ``images``/``annotations``/``categories`` lists;
                                      image ``id``, ``file_name``, ``width``, ``height``;
                                      annotation ``id``, ``image_id``, ``category_id``,
                                      ``bbox``, ``segmentation``, ``iscrowd``, ``area``
                                      (COCO evaluation reads the last two); category
                                      ``id``, ``name``. Ids must be integers.
duplicate_image_id           error    two images share an id (COCO indexes collapse them)
duplicate_ann_id             error    two annotations in one file share an id
duplicate_category_id        error    two categories share an id
unknown_category             error    an annotation's category_id is not declared
ann_missing_image            error    an annotation's image_id is not in ``images``
categories_differ            error    train and val declare different categories (ids or
                                      names): class indices would not line up
image_missing                error    the image file is not on disk
image_undecodable            error    the file cannot be read or fully decoded
size_mismatch                error    ``width``/``height`` differ from the (EXIF-oriented)
                                      file: masks and boxes would be misplaced
polygon_too_few_points       error    a polygon with < 3 points (< 6 numbers); pycocotools
                                      rejects it or reads a 4-number one as a box
invalid_rle                  error    RLE counts undecodable, negative, not summing to
                                      ``h*w``, or RLE size != the image's size
bbox_outside                 warning  box extends > 1 px outside the image, or w/h <= 0
zero_area_mask               warning  the segmentation covers no pixel (empty list,
                                      degenerate polygon, all-zero RLE)
===========================  =======  ===================================================

Crowd annotations (``iscrowd: 1``) with uncompressed RLE (``counts`` as a list) are valid, as are
compressed (string) RLE counts. Image checks read the file (``check_images=False`` limits them to
the sampled images); all other checks only look at the JSON (:func:`check_annotations`).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from instseg_core.datasets.coco import (
    DatasetError,
    annotation_path,
    find_dataset_root,
    is_id,
    is_number,
    is_positive_int,
    load_coco,
    polygon_area,
    rle_counts,
    split_polygons,
)
from instseg_core.datasets.demo import write_demo_images
from instseg_core.datasets.histogram import category_counts, draw_histogram

logger = logging.getLogger(__name__)

Level = Literal["error", "warning"]

# Report order too: errors first, roughly from "file unusable" to "one annotation off".
KIND_LEVELS: dict[str, Level] = {
    "missing_fields": "error",
    "duplicate_image_id": "error",
    "duplicate_ann_id": "error",
    "duplicate_category_id": "error",
    "unknown_category": "error",
    "ann_missing_image": "error",
    "categories_differ": "error",
    "image_missing": "error",
    "image_undecodable": "error",
    "size_mismatch": "error",
    "polygon_too_few_points": "error",
    "invalid_rle": "error",
    "bbox_outside": "warning",
    "zero_area_mask": "warning",
}

RESULT_FILE = "check_dataset_result.json"
HISTOGRAM_FILE = "check_dataset/histogram.png"
BBOX_TOLERANCE = 1.0  # px a box may stick out of the image (rounding in converters)


@dataclass
class Problem:
    """One finding of the deeper checks.

    ``split`` is ``"train"``, ``"val"`` or ``"train+val"`` (cross-split checks); ``ids`` holds
    JSON-ready locators such as ``image_id``, ``ann_id``, ``category_id``, ``file_name`` or
    ``index`` (position in its list when the id itself is unusable).
    """

    kind: str
    level: Level
    split: str
    message: str
    ids: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, kind: str, split: str, message: str, **ids: Any) -> "Problem":
        """A problem whose level is looked up in ``KIND_LEVELS``."""
        return cls(kind, KIND_LEVELS[kind], split, message, ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# one image


def check_image(path_or_bytes: str | os.PathLike[str] | bytes, declared_wh: tuple[int, int] | None, *,
                split: str = "", ids: dict[str, Any] | None = None, name: str | None = None) -> list[Problem]:
    """Check that one image exists, decodes fully and has the declared ``(width, height)``.

    Pure and self-contained (no dataset context) so a distributed validator can call it per
    image. The size comes from the header via PIL, with EXIF orientation applied (as the demo
    drawing and cv2-based loaders see the image); then ``cv2.imdecode`` decodes the whole file,
    which catches truncated or corrupt data that a header read misses. ``declared_wh=None``
    skips the size comparison. ``split``/``ids`` are copied into the problems; ``name`` names
    the image in messages when bytes are given.
    """
    import cv2
    from PIL import Image

    ids = dict(ids or {})
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, where = bytes(path_or_bytes), name or "image data"
    else:
        path = Path(path_or_bytes)
        where = str(path)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return [Problem.of("image_missing", split, f"image file {where!r} not found", **ids)]
        except OSError as e:  # a directory, permissions...
            return [Problem.of("image_undecodable", split, f"cannot read image file {where!r}: {e}", **ids)]
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that transpose
                width, height = height, width
    except Exception as e:  # PIL raises many types for bad headers; any of them means unusable
        return [Problem.of("image_undecodable", split, f"{where}: cannot read image header ({e})", **ids)]
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        return [Problem.of("image_undecodable", split, f"{where}: image data is truncated or corrupt "
                           "(full decode failed)", **ids)]
    if declared_wh is not None and (int(declared_wh[0]), int(declared_wh[1])) != (width, height):
        return [Problem.of("size_mismatch", split, f"{where}: annotation says {int(declared_wh[0])}x"
                           f"{int(declared_wh[1])} (width x height), file is {width}x{height}", **ids)]
    return []


# ---------------------------------------------------------------------------------------------
# JSON-level checks


def _id_or_none(v: Any) -> Any:
    return v if is_id(v) else None


def _top_lists(coco: dict[str, Any], split: str, problems: list[Problem]) -> dict[str, list]:
    out = {}
    for key in ("images", "annotations", "categories"):
        value = coco.get(key)
        if not isinstance(value, list):
            problems.append(Problem.of("missing_fields", split, f"top-level '{key}' is missing or not a list"))
            value = []
        out[key] = value
    return out


def _check_categories(cats: list, split: str, problems: list[Problem]) -> set[int]:
    seen: set[int] = set()
    for idx, cat in enumerate(cats):
        if not isinstance(cat, dict):
            problems.append(Problem.of("missing_fields", split, f"category #{idx} is not an object", index=idx))
            continue
        cid = cat.get("id")
        bad = [name for name, ok in (("id", is_id(cid)), ("name", isinstance(cat.get("name"), str))) if not ok]
        if bad:
            problems.append(Problem.of("missing_fields", split, f"category #{idx}: missing or invalid {', '.join(bad)}",
                                       index=idx, category_id=_id_or_none(cid)))
        if not is_id(cid):
            continue
        if cid in seen:
            problems.append(Problem.of("duplicate_category_id", split, f"category id {cid} is declared more than once",
                                       category_id=cid))
        seen.add(cid)
    return seen


def _check_images(images: list, split: str, problems: list[Problem]) -> dict[int, tuple[int, int] | None]:
    """Validate image entries; returns ``{image_id: (width, height) or None if unusable}``."""
    sizes: dict[int, tuple[int, int] | None] = {}
    for idx, img in enumerate(images):
        if not isinstance(img, dict):
            problems.append(Problem.of("missing_fields", split, f"image #{idx} is not an object", index=idx))
            continue
        iid, fname, w, h = img.get("id"), img.get("file_name"), img.get("width"), img.get("height")
        checks = (("id", is_id(iid)), ("file_name", isinstance(fname, str) and fname != ""),
                  ("width", is_positive_int(w)), ("height", is_positive_int(h)))
        bad = [name for name, ok in checks if not ok]
        if bad:
            problems.append(Problem.of("missing_fields", split, f"image #{idx} ({fname!r}): missing or invalid "
                                       f"{', '.join(bad)}", index=idx, image_id=_id_or_none(iid),
                                       file_name=fname if isinstance(fname, str) else None))
        if not is_id(iid):
            continue
        if iid in sizes:
            problems.append(Problem.of("duplicate_image_id", split, f"image id {iid} is used by more than one image "
                                       f"(again by {fname!r})", image_id=iid, index=idx))
            continue  # keep the first entry's size
        sizes[iid] = (int(w), int(h)) if is_positive_int(w) and is_positive_int(h) else None
    return sizes


def _check_segmentation(seg: Any, size: tuple[int, int] | None, split: str, where: str,
                        ids: dict[str, Any], problems: list[Problem]) -> None:
    if isinstance(seg, list):
        polys, bad = split_polygons(seg)
        few = [r for r in bad if r.startswith("too few points")]
        malformed = [r for r in bad if not r.startswith("too few points")]
        if few:
            problems.append(Problem.of("polygon_too_few_points", split, f"{where}: {'; '.join(few)}", **ids))
        if malformed:
            problems.append(Problem.of("missing_fields", split, f"{where}: segmentation {'; '.join(malformed)}", **ids))
        if not seg:
            problems.append(Problem.of("zero_area_mask", split, f"{where}: segmentation is an empty list", **ids))
        elif polys and size is not None and polygon_area(polys, size[1], size[0]) == 0:
            problems.append(Problem.of("zero_area_mask", split, f"{where}: polygons cover no pixel", **ids))
    elif isinstance(seg, dict):
        runs, err = rle_counts(seg)
        if err:
            problems.append(Problem.of("invalid_rle", split, f"{where}: {err}", **ids))
        elif size is not None and list(seg["size"]) != [size[1], size[0]]:
            problems.append(Problem.of("invalid_rle", split, f"{where}: RLE size {seg['size']} (height, width) differs "
                                       f"from the image's [{size[1]}, {size[0]}]", **ids))
        elif sum(runs[1::2]) == 0:
            problems.append(Problem.of("zero_area_mask", split, f"{where}: RLE mask is empty", **ids))


def _check_bbox(bbox: list, size: tuple[int, int] | None, split: str, where: str, ids: dict[str, Any],
                problems: list[Problem]) -> None:
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        problems.append(Problem.of("bbox_outside", split, f"{where}: bbox {bbox} has a non-positive width or height",
                                   **ids))
    elif size is not None:
        tol = BBOX_TOLERANCE
        if x < -tol or y < -tol or x + w > size[0] + tol or y + h > size[1] + tol:
            problems.append(Problem.of("bbox_outside", split, f"{where}: bbox {bbox} (x, y, w, h) extends outside "
                                       f"the {size[0]}x{size[1]} image", **ids))


def _check_annotation_list(anns: list, sizes: dict[int, tuple[int, int] | None], cat_ids: set[int], split: str,
                           problems: list[Problem]) -> None:
    seen: set[int] = set()
    for idx, ann in enumerate(anns):
        if not isinstance(ann, dict):
            problems.append(Problem.of("missing_fields", split, f"annotation #{idx} is not an object", index=idx))
            continue
        aid, iid, cid = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        bbox, seg = ann.get("bbox"), ann.get("segmentation")
        bbox_ok = isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)
        checks = (("id", is_id(aid)), ("image_id", is_id(iid)), ("category_id", is_id(cid)), ("bbox", bbox_ok),
                  ("segmentation", isinstance(seg, (list, dict))),
                  ("iscrowd", ann.get("iscrowd") in (0, 1) and not isinstance(ann.get("iscrowd"), bool)),
                  ("area", is_number(ann.get("area")) and ann.get("area") >= 0))
        ids = {"ann_id": _id_or_none(aid), "image_id": _id_or_none(iid), "index": idx}
        where = f"annotation {aid}" if is_id(aid) else f"annotation #{idx}"
        bad = [name for name, ok in checks if not ok]
        if bad:
            problems.append(Problem.of("missing_fields", split, f"{where}: missing or invalid {', '.join(bad)}", **ids))
        if is_id(aid):
            if aid in seen:
                problems.append(Problem.of("duplicate_ann_id", split, f"annotation id {aid} is used more than once",
                                           **ids))
            seen.add(aid)
        if is_id(cid) and cid not in cat_ids:
            problems.append(Problem.of("unknown_category", split, f"{where}: category_id {cid} is not in 'categories'",
                                       category_id=cid, **ids))
        size = None
        if is_id(iid):
            if iid not in sizes:
                problems.append(Problem.of("ann_missing_image", split, f"{where}: image_id {iid} is not in 'images'",
                                           **ids))
            else:
                size = sizes[iid]
        if bbox_ok:
            _check_bbox(bbox, size, split, where, ids, problems)
        _check_segmentation(seg, size, split, where, ids, problems)


def _category_names(coco: dict[str, Any]) -> dict[int, Any]:
    cats = coco.get("categories")
    out: dict[int, Any] = {}
    for cat in cats if isinstance(cats, list) else []:
        if isinstance(cat, dict) and is_id(cat.get("id")):
            out.setdefault(cat["id"], cat.get("name"))
    return out


def _short(ids: Sequence[Any], limit: int = 10) -> str:
    return ", ".join(map(str, ids[:limit])) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _check_categories_match(train: dict[str, Any], val: dict[str, Any]) -> list[Problem]:
    tn, vn = _category_names(train), _category_names(val)
    if tn == vn:
        return []
    train_only = sorted(set(tn) - set(vn))
    val_only = sorted(set(vn) - set(tn))
    renamed = sorted(cid for cid in set(tn) & set(vn) if tn[cid] != vn[cid])
    parts = []
    if train_only:
        parts.append(f"ids only in train: {_short(train_only)}")
    if val_only:
        parts.append(f"ids only in val: {_short(val_only)}")
    if renamed:
        parts.append("ids named differently: " + _short([f"{c} ({tn[c]!r} vs {vn[c]!r})" for c in renamed]))
    return [Problem.of("categories_differ", "train+val", "train and val categories differ: " + "; ".join(parts),
                       train_only=train_only, val_only=val_only, renamed=renamed)]


def check_annotations(train: dict[str, Any], val: dict[str, Any]) -> list[Problem]:
    """All JSON-level checks of both splits (no file access); see the module docstring for kinds."""
    problems: list[Problem] = []
    for split, coco in (("train", train), ("val", val)):
        lists = _top_lists(coco, split, problems)
        cat_ids = _check_categories(lists["categories"], split, problems)
        sizes = _check_images(lists["images"], split, problems)
        _check_annotation_list(lists["annotations"], sizes, cat_ids, split, problems)
    problems.extend(_check_categories_match(train, val))
    return problems


def summarize_problems(problems: Iterable[Problem], max_examples: int = 20) -> dict[str, Any]:
    """Counts per level and per kind, with up to ``max_examples`` examples per kind.

    ``{"error_count", "warning_count", "by_kind": {kind: {"level", "count", "examples": [{"split",
    "message", "ids"}, ...]}}}``; kinds are listed errors first, in ``KIND_LEVELS`` order.
    """
    by_kind: dict[str, dict[str, Any]] = {}
    counts = Counter()
    for p in problems:
        counts[p.level] += 1
        entry = by_kind.setdefault(p.kind, {"level": p.level, "count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < max_examples:
            entry["examples"].append({"split": p.split, "message": p.message, "ids": dict(p.ids)})
    order = list(KIND_LEVELS)

    def rank(kind: str) -> tuple[int, int, str]:
        return (0 if by_kind[kind]["level"] == "error" else 1, order.index(kind) if kind in order else len(order), kind)

    return {"error_count": counts["error"], "warning_count": counts["warning"],
            "by_kind": {k: by_kind[k] for k in sorted(by_kind, key=rank)}}


def summary_lines(result: dict[str, Any], examples: int = 2) -> list[str]:
    """A short human summary of a ``check_dataset`` result: the verdict, then each problem kind
    (errors first) with its count and the first ``examples`` messages."""
    deep = result.get("deep_check") or {}
    verdict = "passed" if result.get("check_pass") else "FAILED"
    lines = [f"dataset check {verdict}: {deep.get('error_count', 0)} error(s), "
             f"{deep.get('warning_count', 0)} warning(s)"]
    for kind, entry in (deep.get("by_kind") or {}).items():
        shown = "; ".join(f"{e['split']}: {e['message']}" for e in entry["examples"][:examples])
        lines.append(f"  {entry['level']} {kind} x{entry['count']}: {shown}")
    return lines


# ---------------------------------------------------------------------------------------------
# the whole dataset


def _usable_images(coco: dict[str, Any]) -> list[dict[str, Any]]:
    """Image entries complete enough to be located and checked (first entry wins on a duplicate id)."""
    images = coco.get("images")
    out, seen = [], set()
    for img in images if isinstance(images, list) else []:
        if isinstance(img, dict) and is_id(img.get("id")) and isinstance(img.get("file_name"), str) \
                and img["file_name"] and img["id"] not in seen:
            seen.add(img["id"])
            out.append(img)
    return out


def _declared_wh(img: dict[str, Any]) -> tuple[int, int] | None:
    w, h = img.get("width"), img.get("height")
    return (int(w), int(h)) if is_positive_int(w) and is_positive_int(h) else None


def _check_files(images: list[dict[str, Any]], image_dir: Path, split: str) -> list[Problem]:
    def one(img: dict[str, Any]) -> list[Problem]:
        return check_image(image_dir / img["file_name"], _declared_wh(img), split=split,
                           ids={"image_id": img["id"], "file_name": img["file_name"]})

    if len(images) < 4:
        return [p for img in images for p in one(img)]
    # cv2 and PIL release the GIL while decoding; map() keeps the report order stable.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return [p for found in pool.map(one, images) for p in found]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


FileChecker = Callable[[list[dict[str, Any]], str], list[Problem]]


def check_dataset(dataset_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], *, sample_num: int = 10,
                  max_examples: int = 20, check_images: bool = True,
                  file_checker: FileChecker | None = None) -> dict[str, Any]:
    """Check a PaddleX-layout COCO instance-segmentation dataset and write the report files.

    Returns the dict written to ``<output_dir>/check_dataset_result.json`` (see the module
    docstring). ``check_images=False`` reads only the sampled images instead of every image.
    ``file_checker(images, split)`` replaces the local, threaded check of every image file (the
    distributed validator passes one that spreads the decode checks over a Ray cluster).
    Never writes inside the dataset. Raises :class:`DatasetError` on fatal problems, after
    writing a ``done_flag: false`` result.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _check_dataset(Path(dataset_dir), out, sample_num, max_examples, check_images, file_checker)
    except Exception as e:  # as PaddleX: any failure still leaves a result file
        _write_json(out / RESULT_FILE, {"done_flag": False, "err_type": str(type(e)), "err_msg": str(e)})
        raise


def _check_dataset(dataset_dir: Path, out: Path, sample_num: int, max_examples: int,
                   check_images: bool, file_checker: FileChecker | None = None) -> dict[str, Any]:
    root = find_dataset_root(dataset_dir)
    image_dir = root / "images"
    data = {split: load_coco(annotation_path(root, split)) for split in ("train", "val")}
    problems = check_annotations(data["train"], data["val"])

    cat_names = {**_category_names(data["val"]), **_category_names(data["train"])}
    sample_paths: dict[str, list[str]] = {}
    for split, coco in data.items():
        images = _usable_images(coco)
        samples = images[:max(0, sample_num)]
        if file_checker is not None:
            file_problems = file_checker(images, split)
        else:
            file_problems = _check_files(images if check_images else samples, image_dir, split)
        problems.extend(file_problems)
        unreadable = {p.ids["image_id"] for p in file_problems if p.kind in ("image_missing", "image_undecodable")}
        if len(images) < sample_num:
            logger.info("Only %d images in %s", len(images), annotation_path(root, split).name)
        anns_by_image: dict[Any, list[dict]] = defaultdict(list)
        anns = coco.get("annotations")
        for ann in anns if isinstance(anns, list) else []:
            if isinstance(ann, dict) and is_id(ann.get("image_id")):
                anns_by_image[ann["image_id"]].append(ann)
        sample_paths[split] = write_demo_images([img for img in samples if img["id"] not in unreadable],
                                                anns_by_image, cat_names, image_dir, out)

    (out / HISTOGRAM_FILE).parent.mkdir(parents=True, exist_ok=True)
    draw_histogram(category_counts(data["train"], data["val"]), out / HISTOGRAM_FILE)

    summary = summarize_problems(problems, max_examples)
    n_anns = {s: len(c["annotations"]) if isinstance(c.get("annotations"), list) else 0 for s, c in data.items()}
    result = {
        "done_flag": True,
        "check_pass": summary["error_count"] == 0,
        "attributes": {
            "num_classes": len(_category_names(data["val"])),
            "train_samples": n_anns["train"],
            "train_sample_paths": sample_paths["train"],
            "val_samples": n_anns["val"],
            "val_sample_paths": sample_paths["val"],
        },
        "analysis": {"histogram": HISTOGRAM_FILE},
        "dataset_path": root.name,
        "show_type": "image",
        "dataset_type": "COCOInstSegDataset",
        "deep_check": summary,
    }
    _write_json(out / RESULT_FILE, result)
    return result


__all__ = [
    "KIND_LEVELS", "DatasetError", "Problem", "check_annotations", "check_dataset", "check_image",
    "summarize_problems", "summary_lines",
]
