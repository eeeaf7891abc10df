"""Mask helpers: COCO RLE encode/decode, areas, boxes from masks, polygons.

RLE dicts use COCO's compressed form: ``{"size": [h, w], "counts": str}`` (the
``counts`` bytes from pycocotools decoded as ASCII so the dict is JSON-ready).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as coco_mask

RLE = dict[str, Any]


def encode_rle(masks: np.ndarray) -> list[RLE]:
    """Encode ``[N, H, W]`` binary masks (any dtype, nonzero = inside) as COCO RLE dicts."""
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape [N, H, W], got {masks.shape}")
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray((masks > 0).transpose(1, 2, 0).astype(np.uint8))
    encoded = coco_mask.encode(fortran)
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in encoded]


def _as_coco(rles: Sequence[RLE]) -> list[dict]:
    out = []
    for r in rles:
        counts = r["counts"]
        if isinstance(counts, list):  # uncompressed RLE (e.g. COCO crowd annotations)
            out.append(coco_mask.frPyObjects(r, *r["size"]))
        else:
            out.append({"size": list(r["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
    return out


def decode_rle(rles: Sequence[RLE]) -> np.ndarray:
    """Decode RLE dicts into a bool array ``[N, H, W]`` (N may be 0 only if size is unknown -> ``[0, 0, 0]``)."""
    if len(rles) == 0:
        return np.zeros((0, 0, 0), dtype=bool)
    dense = coco_mask.decode(_as_coco(rles))  # [H, W, N]
    return dense.transpose(2, 0, 1).astype(bool)


def rle_area(rles: Sequence[RLE]) -> np.ndarray:
    """Pixel count of each RLE mask, as int64 ``[N]``."""
    if len(rles) == 0:
        return np.zeros((0,), dtype=np.int64)
    return np.asarray(coco_mask.area(_as_coco(rles)), dtype=np.int64)


def rle_to_xywh(rles: Sequence[RLE]) -> np.ndarray:
    """Tight ``[x, y, w, h]`` box of each RLE mask, float32 ``[N, 4]`` (zeros for an empty mask)."""
    if len(rles) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    return np.asarray(coco_mask.toBbox(_as_coco(rles)), dtype=np.float32).reshape(-1, 4)


def masks_to_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight ``[x1, y1, x2, y2]`` (exclusive right/bottom) of each dense mask; zeros for empty masks."""
    n = len(masks)
    boxes = np.zeros((n, 4), dtype=np.float32)
    if n == 0:
        return boxes
    rows = masks.any(axis=2)  # [N, H]
    cols = masks.any(axis=1)  # [N, W]
    nonempty = rows.any(axis=1)
    h, w = masks.shape[1:]
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    boxes[:] = np.stack([x1, y1, x2, y2], axis=1)
    boxes[~nonempty] = 0
    return boxes


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[list[float]]:
    """Outer contours of one dense mask as flat ``[x1, y1, x2, y2, ...]`` polygons (COCO style)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        if len(c) >= min_points:
            polygons.append(c.reshape(-1).astype(float).tolist())
    return polygons
