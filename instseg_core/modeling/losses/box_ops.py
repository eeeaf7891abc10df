"""Box conversions and IoU / GIoU on paddle tensors (training losses and matchers share these)."""
from __future__ import annotations

import paddle

EPS = 1e-9


def cxcywh_to_xyxy(b: paddle.Tensor) -> paddle.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return paddle.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(b: paddle.Tensor) -> paddle.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return paddle.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def box_area(b: paddle.Tensor) -> paddle.Tensor:
    return (b[..., 2] - b[..., 0]).clip(min=0) * (b[..., 3] - b[..., 1]).clip(min=0)


def _inter_union(a: paddle.Tensor, b: paddle.Tensor):
    """Element-wise intersection and union of xyxy boxes that broadcast against each other."""
    lt = paddle.maximum(a[..., :2], b[..., :2])
    rb = paddle.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def box_iou(a: paddle.Tensor, b: paddle.Tensor, pairwise: bool = False) -> paddle.Tensor:
    """IoU of xyxy boxes: element-wise (same leading shape), or ``[N, M]`` when ``pairwise``."""
    if pairwise:
        a, b = a.unsqueeze(1), b.unsqueeze(0)
    inter, union = _inter_union(a, b)
    return inter / (union + EPS)


def generalized_box_iou(a: paddle.Tensor, b: paddle.Tensor, pairwise: bool = False) -> paddle.Tensor:
    """GIoU of xyxy boxes (Rezatofighi et al. 2019): IoU minus the hull area not covered by the union."""
    if pairwise:
        a, b = a.unsqueeze(1), b.unsqueeze(0)
    inter, union = _inter_union(a, b)
    iou = inter / (union + EPS)
    lt = paddle.minimum(a[..., :2], b[..., :2])
    rb = paddle.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clip(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + EPS)
