"""Task-aligned label assignment (TOOD, Feng et al. 2021), as PP-YOLOE+ trains with it.

For every ground-truth box ``g`` and anchor point ``a`` the alignment metric is

    t(g, a) = s(a, class(g)) ** alpha * IoU(box(g), pred_box(a)) ** beta

with the predicted class probability ``s`` and the predicted box of the anchor. Each GT takes as
candidates the ``topk`` anchors of largest ``t`` among the anchor points that lie inside its box;
an anchor claimed by several GTs goes to the one its predicted box overlaps most. Positives get a
soft, IoU-aware class target: ``t`` rescaled so that each GT's best anchor scores that GT's best
IoU (the varifocal loss regresses this value).

Only the task-aligned assigner is implemented. The reference PP-YOLOE+ detector can warm up with
ATSS for ``static_assigner_epoch`` epochs; PP-YOLOE-seg's own config sets that to -1 (TAL only).
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn.functional as F

from instseg_core.modeling.losses.box_ops import box_iou

EPS = 1e-9


@dataclass
class Assignment:
    """Targets of B images with A anchors and C classes; ``C`` is the background label.

    labels [B,A] int64, boxes [B,A,4] xyxy (GT box of the assigned instance, 0 for background),
    scores [B,A,C] soft one-hot targets, gt_index [B,A] int64 index into the image's GT list
    (0 for background: read it only where ``positive``), positive [B,A] bool.
    """

    labels: paddle.Tensor
    boxes: paddle.Tensor
    scores: paddle.Tensor
    gt_index: paddle.Tensor
    positive: paddle.Tensor


def points_inside_boxes(points: paddle.Tensor, boxes: paddle.Tensor,
                        rel_margin: float = 1e-3) -> paddle.Tensor:
    """[B,n,A] bool: anchor point ``points`` [A,2] lies strictly inside box ``boxes`` [B,n,4].

    "Strictly" means its distance to the nearest side exceeds ``rel_margin * sqrt(box area)``, so
    that points on (or numerically at) an edge, whose ltrb target would be ~0, are not candidates.
    """
    x = points[:, 0].reshape([1, 1, -1])
    y = points[:, 1].reshape([1, 1, -1])
    x1, y1, x2, y2 = [c.unsqueeze(-1) for c in boxes.unbind(-1)]
    nearest = paddle.minimum(paddle.minimum(x - x1, y - y1), paddle.minimum(x2 - x, y2 - y))
    scale = paddle.sqrt(((x2 - x1) * (y2 - y1)).clip(min=0)).clip(min=1e-4)
    return nearest > rel_margin * scale


def topk_mask(metrics: paddle.Tensor, k: int) -> paddle.Tensor:
    """[B,n,A] bool marking, for each GT row of ``metrics`` [B,n,A], its ``k`` largest entries."""
    k = min(k, int(metrics.shape[-1]))
    _, idx = paddle.topk(metrics, k, axis=-1)
    picked = paddle.put_along_axis(paddle.zeros_like(metrics), idx, 1.0, axis=-1)
    return picked > 0


class TaskAlignedAssigner:
    """``assigner(pred_scores, pred_boxes, anchor_points, gt_labels, gt_boxes, gt_valid)``.

    Inputs: pred_scores [B,A,C] probabilities, pred_boxes [B,A,4] xyxy and anchor_points [A,2]
    in the same (pixel) units as gt_boxes [B,n,4]; gt_labels [B,n] int64; gt_valid [B,n] bool
    (False on the padding rows of images with fewer than n instances). Returns an
    :class:`Assignment`. Computed without gradients: assignment is a target, not a prediction.
    """

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = EPS):
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @paddle.no_grad()
    def __call__(self, pred_scores: paddle.Tensor, pred_boxes: paddle.Tensor,
                 anchor_points: paddle.Tensor, gt_labels: paddle.Tensor, gt_boxes: paddle.Tensor,
                 gt_valid: paddle.Tensor) -> Assignment:
        b, a, c = pred_scores.shape
        n = int(gt_boxes.shape[1])
        if n == 0:
            return _background(b, a, c)

        # IoU of every GT with every predicted box, and the score of the GT's class: [B,n,A]
        ious = box_iou(gt_boxes.unsqueeze(2), pred_boxes.unsqueeze(1))
        onehot = F.one_hot(gt_labels, c).astype(pred_scores.dtype)  # [B,n,C]
        cls_scores = paddle.matmul(onehot, pred_scores, transpose_y=True)
        metrics = cls_scores.pow(self.alpha) * ious.pow(self.beta)

        # candidates: top-k metric among the anchor points inside the GT box (real GTs only)
        inside = points_inside_boxes(anchor_points, gt_boxes) & gt_valid.unsqueeze(-1)
        candidate = topk_mask(metrics * inside.astype(metrics.dtype), self.topk) & inside

        # an anchor claimed by several GTs keeps the claimant its prediction overlaps most
        claim_iou = paddle.where(candidate, ious, paddle.full_like(ious, -1.0))
        gt_index = claim_iou.argmax(axis=1)  # [B,A]
        positive = candidate.any(axis=1)  # [B,A]
        owner = F.one_hot(gt_index, n).transpose([0, 2, 1]).astype("bool")  # [B,n,A]
        mask_pos = (owner & positive.unsqueeze(1)).astype(metrics.dtype)

        labels = paddle.take_along_axis(gt_labels, gt_index, axis=1)
        labels = paddle.where(positive, labels, paddle.full_like(labels, c))
        boxes = paddle.take_along_axis(gt_boxes, gt_index.unsqueeze(-1).expand([b, a, 4]), axis=1)
        boxes = boxes * positive.unsqueeze(-1).astype(boxes.dtype)

        # soft targets: each GT's metrics rescaled so that its best positive scores its best IoU
        metrics = metrics * mask_pos
        max_metric = metrics.max(axis=-1, keepdim=True)
        max_iou = (ious * mask_pos).max(axis=-1, keepdim=True)
        quality = (metrics / (max_metric + self.eps) * max_iou).max(axis=1)  # [B,A]
        scores = F.one_hot(labels, c + 1)[..., :c].astype(pred_scores.dtype) * quality.unsqueeze(-1)
        return Assignment(labels, boxes, scores, gt_index, positive)


def _background(b: int, a: int, c: int) -> Assignment:
    """The assignment of a batch without any GT: every anchor is background."""
    return Assignment(labels=paddle.full([b, a], c, dtype="int64"),
                      boxes=paddle.zeros([b, a, 4]), scores=paddle.zeros([b, a, c]),
                      gt_index=paddle.zeros([b, a], dtype="int64"),
                      positive=paddle.zeros([b, a], dtype="bool"))

