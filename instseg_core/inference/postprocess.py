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

from typing import Protocol, Sequence

import cv2
import numpy as np

from instseg_core.masks import encode_rle, masks_to_xyxy, rle_to_xywh
from instseg_core.structures import Instances


# The two conventions' output names, in the graph's order (the sorted keys of the exported dict);
# a network's eval forward returns the same keys (instseg_core.modeling.base.InstanceSegModel.output_keys).
BOX_OUTPUTS: tuple[str, ...] = ("bbox", "bbox_num", "mask")
SOLOV2_OUTPUTS: tuple[str, ...] = ("bbox_num", "cate_label", "cate_score", "segm")


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


def _canvas_mask(masks: np.ndarray, i: int, h: int, w: int) -> np.ndarray:
    """Row ``i`` of the graph's masks as bool on an exact (h, w) canvas: batch padding cropped, a
    canvas one pixel short padded with background (PP-YOLOE sizes it ``floor(im_shape / scale)``,
    e.g. 599 for 600 rows: resizing would shift the whole mask), any other size resized (Mask-RT-DETR's
    batch graph sizes every image's masks from the batch). Only this one mask is converted."""
    src = masks[i]
    mh, mw = src.shape
    if mh >= h - 1 and mw >= w - 1:
        out = np.zeros((h, w), dtype=bool)
        ch, cw = min(mh, h), min(mw, w)
        np.greater(src[:ch, :cw], 0, out=out[:ch, :cw])
        return out
    small = (src > 0).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST) > 0


def upscale_mask(mask: np.ndarray, image_hw: tuple[int, int], mask_scale: float) -> np.ndarray:
    """A bool mask computed on a grid ``mask_scale`` times the image's size, back at full size.

    Bilinear on the 0/1 mask, cut at one half (a smooth edge, not nearest's staircase), with the
    exact scale: full-size pixel centre ``x`` samples ``(x + 0.5) * mask_scale - 0.5``, whatever
    rounding the graph used for its canvas. Only the mask's own extent (plus a pixel) is resampled,
    so a small object costs little even on a 100 MP image.
    """
    h, w = image_hw
    out = np.zeros((h, w), dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return out
    r = float(mask_scale)
    # the full-size window whose samples can touch the mask's pixels (+1 for the bilinear taps)
    y0 = max(0, int(np.floor((rows[0] - 1 + 0.5) / r - 0.5)))
    y1 = min(h, int(np.ceil((rows[-1] + 1 + 0.5) / r - 0.5)) + 1)
    x0 = max(0, int(np.floor((cols[0] - 1 + 0.5) / r - 0.5)))
    x1 = min(w, int(np.ceil((cols[-1] + 1 + 0.5) / r - 0.5)) + 1)
    if y1 <= y0 or x1 <= x0:
        return out
    # inverse map: window pixel (u, v) -> source ((x0 + u + 0.5) * r - 0.5, (y0 + v + 0.5) * r - 0.5)
    affine = np.array([[r, 0.0, (x0 + 0.5) * r - 0.5], [0.0, r, (y0 + 0.5) * r - 0.5]], dtype=np.float64)
    src = mask.astype(np.uint8) * 255
    window = cv2.warpAffine(src, affine, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    out[y0:y1, x0:x1] = window >= 128
    return out


def _kept_masks(masks: np.ndarray, sel: np.ndarray, image_hw: tuple[int, int], mask_scale: float,
                rle: bool) -> np.ndarray | list:
    """The masks of the kept rows ``sel`` at full image size: dense bool ``[K, H, W]``, or (``rle``)
    a list of COCO RLE dicts built one mask at a time, so at most one full-size mask is held."""
    h, w = image_hw
    reduced = mask_scale < 1.0
    # the canvas the graph drew on: the image's size times mask_scale (rounded up; the graph may floor)
    ch, cw = (int(np.ceil(h * mask_scale)), int(np.ceil(w * mask_scale))) if reduced else (h, w)
    dense = None if rle else np.zeros((len(sel), h, w), dtype=bool)
    encoded = []
    for k, i in enumerate(sel):
        m = _canvas_mask(masks, int(i), ch, cw)
        if reduced:
            m = upscale_mask(m, (h, w), mask_scale)
        if rle:
            encoded.append(encode_rle(m[None])[0])
        else:
            dense[k] = m
    return encoded if rle else dense


def box_instances(rows: np.ndarray, masks: np.ndarray, image_hw: tuple[int, int], threshold: float, *,
                  mask_scale: float = 1.0, rle: bool = False) -> Instances:
    """One image of a box model: threshold, clip to the image, drop degenerate boxes with their masks.

    ``mask_scale`` < 1: the graph was told the image is that much smaller (the predictor's
    ``max_mask_side``), so its boxes are scaled back and only the kept masks are upsampled.
    ``rle``: masks come back as COCO RLE, encoded one at a time (no dense ``[K, H, W]`` array).
    """
    h, w = image_hw
    keep = (rows[:, 1] > threshold) & (rows[:, 0] > -1)
    rows = rows[keep]
    boxes = rows[:, 2:6].astype(np.float32, copy=True)
    if mask_scale < 1.0:
        boxes /= np.float32(mask_scale)
    np.maximum(boxes[:, 0:2], 0, out=boxes[:, 0:2])
    np.minimum(boxes[:, 2], w, out=boxes[:, 2])
    np.minimum(boxes[:, 3], h, out=boxes[:, 3])
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    sel = np.flatnonzero(keep)[valid]
    return Instances(
        boxes=boxes[valid],
        scores=rows[valid, 1],
        class_ids=rows[valid, 0].astype(np.int64),
        masks=_kept_masks(masks, sel, (h, w), mask_scale, rle),
        image_size=(h, w),
    )


def solov2_instances(outputs: Sequence[np.ndarray], image_hw: tuple[int, int], threshold: float, *,
                     strict: bool = False, mask_scale: float = 1.0, rle: bool = False) -> Instances:
    """One image of SOLOv2 (batch 1): keep ``score >= threshold`` (PaddleX's rule) or, with
    ``strict``, ``score > threshold`` (as the box models; 0 then drops the zero-score padding row);
    boxes are the masks' extents. ``mask_scale`` and ``rle`` as in :func:`box_instances`."""
    if len(outputs) != 4:
        raise OutputFormatError(f"SOLOv2 should give 4 outputs (bbox_num, cate_label, cate_score, segm), "
                                f"got {len(outputs)}")
    _, labels, scores, segm = outputs
    labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores).reshape(-1)
    if segm.ndim != 3 or len(segm) != len(labels) or len(scores) != len(labels):
        raise OutputFormatError(f"unexpected SOLOv2 output shapes: cate_label {labels.shape}, "
                                f"cate_score {scores.shape}, segm {segm.shape}")
    keep = scores > threshold if strict else scores >= threshold
    sel = np.flatnonzero(keep)
    h, w = image_hw
    masks = _kept_masks(segm, sel, (h, w), mask_scale, rle)
    boxes = (rle_to_xywh(masks) @ _XYWH_TO_XYXY) if rle else masks_to_xyxy(masks)
    return Instances(boxes=boxes, scores=scores[sel], class_ids=labels[sel].astype(np.int64),
                     masks=masks, image_size=(h, w), boxes_from_masks=True)


class PostProcess(Protocol):
    """A family's post-process (``instseg_core.families.Family.postprocess``): the raw outputs of
    one graph call over ``len(image_hws)`` images -> one :class:`Instances` per image.

    ``mask_scales`` (default 1 each) and ``rle`` as in :func:`box_instances`; ``strict`` keeps
    ``score > threshold`` where PaddleX keeps ``score >= threshold`` (SOLOv2), so a threshold of 0
    drops the models' zero-score padding rows.
    """

    def __call__(self, outputs: Sequence[np.ndarray], image_hws: Sequence[tuple[int, int]], threshold: float, *,
                 mask_scales: Sequence[float] | None = None, rle: bool = False,
                 strict: bool = False) -> list[Instances]: ...


def box_outputs_to_instances(outputs: Sequence[np.ndarray], image_hws: Sequence[tuple[int, int]], threshold: float,
                             *, mask_scales: Sequence[float] | None = None, rle: bool = False,
                             strict: bool = False) -> list[Instances]:
    """The :class:`PostProcess` of the box families (``bbox``, ``bbox_num``, ``mask``; a batch per
    call). Their rule is already ``score > threshold``, so ``strict`` changes nothing."""
    scales = [1.0] * len(image_hws) if mask_scales is None else mask_scales
    per_image = split_box_outputs(outputs, len(image_hws))
    return [box_instances(rows, masks, hw, threshold, mask_scale=scale, rle=rle)
            for (rows, masks), hw, scale in zip(per_image, image_hws, scales)]


def solov2_outputs_to_instances(outputs: Sequence[np.ndarray], image_hws: Sequence[tuple[int, int]],
                                threshold: float, *, mask_scales: Sequence[float] | None = None, rle: bool = False,
                                strict: bool = False) -> list[Instances]:
    """The :class:`PostProcess` of SOLOv2, whose graph describes image 0 of its input only (one
    image per call, as PaddleX runs it)."""
    if len(image_hws) != 1:
        raise OutputFormatError(f"a SOLOv2 graph describes one image per call, not {len(image_hws)}")
    scale = 1.0 if mask_scales is None else mask_scales[0]
    return [solov2_instances(outputs, image_hws[0], threshold, strict=strict, mask_scale=scale, rle=rle)]


# [x, y, w, h] @ this = [x1, y1, x2, y2]
_XYWH_TO_XYXY = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
