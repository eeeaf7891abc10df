"""COCO instance-segmentation datasets in PaddleX's layout: finding the root, loading, masks.

Layout (PaddleX ``COCOInstSegDataset``)::

    <dataset_dir>/**/<root>/images/<file_name>
    <root>/annotations/instance_train.json
    <root>/annotations/instance_val.json

The helpers here never trust the JSON: segmentation parsing returns ``None`` / an error string
instead of raising, and RLE ``counts`` are validated in Python before pycocotools sees them (its C
decoder writes past the mask buffer when the counts add up to more than ``h * w``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instseg_core.datasets.layout import layout_hint

ANNOTATION_FILES: dict[str, str] = {"train": "instance_train.json", "val": "instance_val.json"}
LAYOUT_HELP = (
    "expected layout: <dataset_dir>/**/<root>/images/<image files>, "
    "<root>/annotations/instance_train.json and <root>/annotations/instance_val.json"
)


def _with_hint(message: str, folder: str | os.PathLike[str]) -> str:
    """``message`` plus the conversion advice for ``folder`` when its layout is recognised."""
    hint = layout_hint(folder)
    return f"{message}; {hint}" if hint else f"{message}; {LAYOUT_HELP}"


class DatasetError(Exception):
    """A fatal dataset problem (no root, missing or unreadable annotation file...).

    The message names the offending path and says how to fix it.
    """


def find_dataset_root(dataset_dir: str | os.PathLike[str]) -> Path:
    """The dataset root: the parent of the single ``images`` directory under ``dataset_dir``.

    Like PaddleX, ``Path(dataset_dir).glob("**/images")`` must find exactly one match (only
    directories count here). Raises :class:`DatasetError` listing what was found otherwise.
    """
    base = Path(dataset_dir)
    if not base.is_dir():
        raise DatasetError(f"dataset directory {str(base)!r} does not exist or is not a directory; {LAYOUT_HELP}")
    found = sorted(p for p in base.glob("**/images") if p.is_dir())
    if not found:
        raise DatasetError(_with_hint(f"no 'images' directory found under {str(base)!r}", base))
    if len(found) > 1:
        shown = ", ".join(repr(str(p)) for p in found[:10])
        if len(found) > 10:
            shown += f" (and {len(found) - 10} more)"
        raise DatasetError(
            f"found {len(found)} 'images' directories under {str(base)!r}: {shown}; exactly one is allowed "
            f"(remove or rename the extra ones, or point at a narrower directory); {LAYOUT_HELP}")
    return found[0].parent


def annotation_path(root: str | os.PathLike[str], split: str) -> Path:
    """``<root>/annotations/instance_<split>.json``; raises :class:`DatasetError` if it is missing."""
    path = Path(root) / "annotations" / ANNOTATION_FILES[split]
    if not path.is_file():
        message = (f"annotation file {str(path)!r} not found; ensure that both instance_train.json and "
                   f"instance_val.json exist in {str(Path(root) / 'annotations')!r}")
        hint = layout_hint(root)
        raise DatasetError(f"{message}; {hint}" if hint else message)
    return path


def load_coco(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a COCO JSON file; any failure becomes a :class:`DatasetError` naming the file.

    JSON syntax errors report line and column. Only the top-level type is checked here (it must
    be an object); field-level problems are :func:`instseg_core.datasets.check.check_annotations`'s job.
    """
    path = Path(path)
    try:
        # utf-8-sig: tolerate a BOM, which some Windows editors add.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"annotation file {str(path)!r} not found; create it or fix the path") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"annotation file {str(path)!r} is not UTF-8 text ({e}); re-save it as UTF-8 JSON") from None
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {str(path)!r}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"annotation file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
            f"fix or regenerate the file") from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"annotation file {str(path)!r} must hold a JSON object with 'images', 'annotations' and "
            f"'categories', not a {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# segmentation parsing (shared by the checks and the demo drawing)


def is_id(v: Any) -> bool:
    """A JSON integer (bool excluded): what COCO ids must be."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A JSON number (bool excluded, NaN/inf excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def is_positive_int(v: Any) -> bool:
    """A positive integral JSON number (``640`` or ``640.0``)."""
    return is_number(v) and v > 0 and float(v).is_integer()


def split_polygons(segmentation: list[Any]) -> tuple[list[list[float]], list[str]]:
    """Split a polygon list into usable polygons and human-readable reasons for the rest.

    A usable polygon is a flat list of an even number (>= 6) of finite numbers. A reason starting
    with ``"too few points"`` marks a polygon with fewer than 3 points; others are malformed.
    """
    good: list[list[float]] = []
    bad: list[str] = []
    for k, poly in enumerate(segmentation):
        if not isinstance(poly, list) or not all(is_number(v) for v in poly):
            bad.append(f"polygon {k} is not a flat list of numbers")
        elif len(poly) % 2:
            bad.append(f"polygon {k} has an odd number of coordinates ({len(poly)})")
        elif len(poly) < 6:
            bad.append(f"too few points: polygon {k} has {len(poly) // 2} point(s), at least 3 are needed")
        else:
            good.append([float(v) for v in poly])
    return good, bad


def decode_counts_string(s: str) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths; raises ValueError when malformed.

    Format: each run is a little-endian sequence of 5-bit groups stored as ``chr(48 + group)``,
    bit 0x20 of a character meaning "more groups follow" and bit 0x10 of the last one the sign;
    from the third run on the value is a delta to the run two places earlier.
    """
    counts: list[int] = []
    i, n = 0, len(s)
    while i < n:
        x, shift, more = 0, 0, True
        while more:
            if i >= n:
                raise ValueError("string ends in the middle of a run")
            c = ord(s[i]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {s[i]!r} at position {i}")
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            i += 1
            shift += 5
            if not more and c & 0x10:
                x -= 1 << shift  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_counts(rle: Any) -> tuple[list[int] | None, str | None]:
    """Run lengths of an RLE segmentation dict, validated against its ``size``.

    Returns ``(counts, None)`` or ``(None, reason)``. Accepts both uncompressed (list of ints, as
    in COCO crowd annotations) and compressed (string) counts.
    """
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and v >= 0 for v in size)):
        return None, f"RLE size {size!r} is not [height, width]"
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        try:
            runs = decode_counts_string(counts)
        except ValueError as e:
            return None, f"compressed RLE counts cannot be decoded: {e}"
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        runs = counts
    else:
        return None, "RLE counts must be a list of integers or a compressed string"
    if any(v < 0 for v in runs):
        return None, "RLE counts contain a negative run"
    total, expected = sum(runs), size[0] * size[1]
    if total != expected:
        return None, f"RLE counts cover {total} pixels, but size {size} has {expected}"
    return runs, None


def runs_to_mask(runs: Sequence[int], height: int, width: int) -> np.ndarray:
    """Dense bool mask from validated RLE run lengths (column-major, starting with a 0-run)."""
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(width, height).T


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray | None:
    """Dense bool mask ``[height, width]`` of a segmentation, or None if it is unusable.

    Polygons are rasterised with pycocotools (``frPyObjects`` + ``merge``), skipping malformed
    parts; an RLE is used only when valid and of exactly this size. Runs are expanded with
    numpy (pycocotools' ``decode`` warns under numpy 2 and trusts its input).
    """
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        polys, _ = split_polygons(segmentation)
        if not polys:
            return None
        rle = coco_mask.merge(coco_mask.frPyObjects(polys, height, width))
        runs = decode_counts_string(rle["counts"].decode("ascii"))
    elif isinstance(segmentation, dict):
        runs, err = rle_counts(segmentation)
        if err or list(segmentation["size"]) != [height, width]:
            return None
    else:
        return None
    return runs_to_mask(runs, height, width)


def polygon_area(polygons: Sequence[list[float]], height: int, width: int) -> int:
    """Pixel area of the union of valid polygons rasterised on a ``height x width`` image."""
    from pycocotools import mask as coco_mask

    if not polygons:
        return 0
    return int(coco_mask.area(coco_mask.merge(coco_mask.frPyObjects(list(polygons), height, width))))
