"""Raw graph outputs -> one ``Instances`` per image.

Two output conventions (outputs in the graph's order, which is the sorted key order of the
exported dict):

* box models (Mask-RT-DETR, MaskRCNN, Cascade, PP-YOLOE_seg): ``bbox [M,6] = [cls, score, x1, y1,
  x2, y2]``, ``bbox_num [N]``, ``mask [M,H,W]`` (full image, padded to the largest image of the batch);
* SOLOv2: ``bbox_num``, ``cate_label [K]``, ``cate_score [K]``, ``segm [K,H,W]``.

Threshold semantics are PaddleX's: box models keep ``score > t`` and ``cls > -1``; SOLOv2 keeps
``score >= t``. Unlike PaddleX, a box dropped for being degenerate after clipping drops its own
mask too (PaddleX drops the box but keeps the mask list, shifting later masks onto wrong boxes).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from instseg_core.masks import masks_to_xyxy
from instseg_core.structures import Instances


class OutputFormatError(RuntimeError):
    """The graph's outputs do not look like the convention its ``arch`` promises."""


def split_box_outputs(outputs: Sequence[np.ndarray], num_images: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Slice batched ``bbox``/``mask`` rows into per-image ``(rows, masks)`` using ``bbox_num``."""
    if len(outputs) != 3:
        raise OutputFormatError(f"box model should give 3 outputs (bbox, bbox_num, mask), got {len(outputs)}")
    bbox, bbox_num, mask = outputs
    bbox_num = np.asarray(bbox_num).reshape(-1)
    if bbox.ndim != 2 or bbox.shape[-1] != 6 or mask.ndim != 3:
        raise OutputFormatError(f"unexpected output shapes bbox {bbox.shape}, mask {mask.shape}")
    if len(bbox_num) != num_images or int(bbox_num.sum()) != len(bbox):
        raise OutputFormatError(f"bbox_num {bbox_num.tolist()} does not describe {num_images} images "
                                f"and {len(bbox)} rows")
    ends = np.cumsum(bbox_num)
    starts = ends - bbox_num
    return [(bbox[s:e], mask[s:e]) for s, e in zip(starts, ends)]


def _fit_masks(masks: np.ndarray, h: int, w: int) -> np.ndarray:
    """Full-image bool masks of exactly (h, w): crop batch padding; pad a canvas one pixel short;
    resize if the graph sized them from another image of the batch (Mask-RT-DETR's exported
    post-process does)."""
    if masks.shape[1] >= h and masks.shape[2] >= w:
        return masks[:, :h, :w] > 0
    if masks.shape[1] >= h - 1 and masks.shape[2] >= w - 1:
        # Same pixel grid, last row/column cut by float truncation (PP-YOLOE's post-process sizes
        # the canvas floor(im_shape / scale_factor), as the reference, e.g. 599 for 600 rows):
        # pad with background. Resizing would shift the whole mask by up to a pixel.
        out = np.zeros((len(masks), h, w), dtype=bool)
        mh, mw = min(masks.shape[1], h), min(masks.shape[2], w)
        out[:, :mh, :mw] = masks[:, :mh, :mw] > 0
        return out
    if len(masks) == 0:
        return np.zeros((0, h, w), dtype=bool)
    src = (masks > 0).astype(np.uint8).transpose(1, 2, 0)
    out = cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST)
    return out.reshape(h, w, -1).transpose(2, 0, 1) > 0


def box_instances(rows: np.ndarray, masks: np.ndarray, image_hw: tuple[int, int], threshold: float) -> Instances:
    """One image of a box model: threshold, clip to the image, drop degenerate boxes with their masks."""
    h, w = image_hw
    keep = (rows[:, 1] > threshold) & (rows[:, 0] > -1)
    rows = rows[keep]
    boxes = rows[:, 2:6].astype(np.float32, copy=True)
    np.maximum(boxes[:, 0:2], 0, out=boxes[:, 0:2])
    np.minimum(boxes[:, 2], w, out=boxes[:, 2])
    np.minimum(boxes[:, 3], h, out=boxes[:, 3])
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    sel = np.flatnonzero(keep)[valid]
    return Instances(
        boxes=boxes[valid],
        scores=rows[valid, 1],
        class_ids=rows[valid, 0].astype(np.int64),
        masks=_fit_masks(masks[sel], h, w),
        image_size=(h, w),
    )


def solov2_instances(outputs: Sequence[np.ndarray], image_hw: tuple[int, int], threshold: float, *,
                     strict: bool = False) -> Instances:
    """One image of SOLOv2 (batch 1): keep ``score >= threshold`` (PaddleX's rule) or, with
    ``strict``, ``score > threshold`` (as the box models; 0 then drops the zero-score padding row);
    boxes are the masks' extents."""
    if len(outputs) != 4:
        raise OutputFormatError(f"SOLOv2 should give 4 outputs (bbox_num, cate_label, cate_score, segm), "
                                f"got {len(outputs)}")
    _, labels, scores, segm = outputs
    labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores).reshape(-1)
    if segm.ndim != 3 or len(segm) != len(labels) or len(scores) != len(labels):
        raise OutputFormatError(f"unexpected SOLOv2 output shapes: cate_label {labels.shape}, "
                                f"cate_score {scores.shape}, segm {segm.shape}")
    keep = scores > threshold if strict else scores >= threshold
    h, w = image_hw
    masks = _fit_masks(segm[keep], h, w)
    return Instances(boxes=masks_to_xyxy(masks), scores=scores[keep], class_ids=labels[keep].astype(np.int64),
                     masks=masks, image_size=(h, w), boxes_from_masks=True)
