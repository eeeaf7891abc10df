"""The problems a COCO instance-segmentation dataset can have, and the checks that find them.

Pure functions over the parsed JSON (:func:`check_annotations`) and over one image file or its
bytes (:func:`check_image`); :func:`instseg_core.datasets.check.check_dataset` runs them over a
whole dataset and writes the report, ``pipelines/validate.py`` spreads the image checks over a
Ray cluster.

Kinds of problem (``KIND_LEVELS``). Errors break training or evaluation, or silently
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
compressed (string) RLE counts. Image checks read the file (``check_dataset(check_images=False)``
limits them to the sampled images); all other checks only look at the JSON (:func:`check_annotations`).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from instseg_core.datasets.coco import (
    is_id,
    is_number,
    is_positive_int,
    polygon_area,
    rle_counts,
    split_polygons,
)

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


def category_names(coco: dict[str, Any]) -> dict[int, Any]:
    """``{category id: name}`` of the usable category entries (the first entry wins on a repeated id)."""
    cats = coco.get("categories")
    out: dict[int, Any] = {}
    for cat in cats if isinstance(cats, list) else []:
        if isinstance(cat, dict) and is_id(cat.get("id")):
            out.setdefault(cat["id"], cat.get("name"))
    return out


def _short(ids: Sequence[Any], limit: int = 10) -> str:
    return ", ".join(map(str, ids[:limit])) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _check_categories_match(train: dict[str, Any], val: dict[str, Any]) -> list[Problem]:
    tn, vn = category_names(train), category_names(val)
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


__all__ = ["KIND_LEVELS", "Problem", "category_names", "check_annotations", "check_image", "summarize_problems"]
