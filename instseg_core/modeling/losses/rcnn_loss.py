"""Losses of Mask R-CNN / Cascade Mask R-CNN (PaddleDetection's formulation).

* RPN (:func:`rpn_loss`): binary cross-entropy of the objectness logits of the sampled anchors
  and L1 of the deltas of the sampled positives, both summed and divided by the fixed number of
  anchors sampled per batch (256 x images), as the reference does.
* Box head (:func:`box_head_loss`): softmax cross-entropy over ``num_classes + 1`` (background is
  the last column) averaged over the sampled RoIs; L1 of the foreground RoIs' deltas (the GT
  class's 4 columns for class-specific heads, the only 4 for the cascade's class-agnostic ones)
  against :func:`.rcnn_targets.encode_deltas` with the head's weights, summed and divided by
  the number of sampled RoIs.
* Mask head (:func:`mask_loss`): per-pixel binary cross-entropy of the GT class's M x M logits,
  averaged over foreground RoIs and pixels.

Every term is a 0-D tensor. A term without any sample is an exact zero that is still connected
to the outputs it would use, so every parameter gets a (zero) gradient.
"""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn.functional as F

from instseg_core.modeling.losses.rcnn_targets import AnchorTargets, RoITargets, encode_deltas

__all__ = ["flatten_rpn_outputs", "rpn_loss", "box_head_loss", "mask_loss"]


def flatten_rpn_outputs(scores: Sequence[paddle.Tensor], deltas: Sequence[paddle.Tensor]):
    """Per-level RPN maps (``[B, A, H, W]`` logits, ``[B, 4A, H, W]`` deltas) -> ``[B, N]`` and
    ``[B, N, 4]`` in the anchors' order (level, cell row-major, anchor)."""
    flat_scores = [s.transpose([0, 2, 3, 1]).reshape([s.shape[0], -1]) for s in scores]
    flat_deltas = [d.transpose([0, 2, 3, 1]).reshape([d.shape[0], -1, 4]) for d in deltas]
    return paddle.concat(flat_scores, axis=1), paddle.concat(flat_deltas, axis=1)


def rpn_loss(scores: paddle.Tensor, deltas: paddle.Tensor, targets: list[AnchorTargets],
             batch_size_per_im: int) -> dict[str, paddle.Tensor]:
    """``loss_rpn_cls`` and ``loss_rpn_reg`` of logits ``scores`` [B, N] and ``deltas`` [B, N, 4]
    (see :func:`flatten_rpn_outputs`) against one :class:`AnchorTargets` per image."""
    labels = paddle.concat([t.labels for t in targets])
    target_deltas = paddle.concat([t.deltas for t in targets])
    scores = scores.reshape([-1])
    deltas = deltas.reshape([-1, 4])
    norm = float(batch_size_per_im * len(targets))

    valid = paddle.nonzero(labels >= 0).reshape([-1])
    if valid.shape[0] == 0:
        loss_cls = scores.sum() * 0.0
    else:
        loss_cls = F.binary_cross_entropy_with_logits(
            paddle.gather(scores, valid), paddle.gather(labels, valid).astype("float32"), reduction="sum")
    pos = paddle.nonzero(labels == 1).reshape([-1])
    if pos.shape[0] == 0:
        loss_reg = deltas.sum() * 0.0
    else:
        loss_reg = (paddle.gather(deltas, pos) - paddle.gather(target_deltas, pos)).abs().sum()
    return {"loss_rpn_cls": loss_cls / norm, "loss_rpn_reg": loss_reg / norm}


def box_head_loss(logits: paddle.Tensor, deltas: paddle.Tensor, targets: list[RoITargets],
                  num_classes: int, weights: Sequence[float]) -> dict[str, paddle.Tensor]:
    """``loss_bbox_cls`` and ``loss_bbox_reg`` of one box head.

    ``logits`` [R, C+1] and ``deltas`` [R, 4C] (class-specific) or [R, 4] (class-agnostic) are
    the head's outputs on the RoIs of ``targets`` (concatenated in image order); ``weights`` the
    head's delta scaling ([10, 10, 5, 5]; cascade stages [20, 20, 10, 10], [30, 30, 15, 15]).
    """
    labels = paddle.concat([t.labels for t in targets])
    rois = paddle.concat([t.rois for t in targets])
    gt_boxes = paddle.concat([t.gt_boxes for t in targets])
    num_rois = float(labels.shape[0])

    valid = paddle.nonzero(labels >= 0).reshape([-1])
    if valid.shape[0] == 0:
        loss_cls = logits.sum() * 0.0
    else:
        loss_cls = F.cross_entropy(paddle.gather(logits, valid), paddle.gather(labels, valid), reduction="mean")

    fg = paddle.nonzero(paddle.logical_and(labels >= 0, labels < num_classes)).reshape([-1])
    if fg.shape[0] == 0:
        return {"loss_bbox_cls": loss_cls, "loss_bbox_reg": deltas.sum() * 0.0}
    fg_deltas = paddle.gather(deltas, fg)
    if int(deltas.shape[1]) != 4:  # class-specific: the 4 columns of each RoI's GT class
        cols = 4 * paddle.gather(labels, fg).unsqueeze(1) + paddle.arange(4, dtype="int64").unsqueeze(0)
        fg_deltas = paddle.take_along_axis(fg_deltas, cols, axis=1)
    target = encode_deltas(paddle.gather(rois, fg), paddle.gather(gt_boxes, fg), weights).detach()
    loss_reg = (fg_deltas - target).abs().sum() / num_rois
    return {"loss_bbox_cls": loss_cls, "loss_bbox_reg": loss_reg}


def mask_loss(logits: paddle.Tensor, labels: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
    """Mean per-pixel BCE of the class-``labels`` [P] channel of ``logits`` [P, C, M, M] against
    ``targets`` [P, M, M] (0/1); zero (still connected to ``logits``) when P is 0."""
    if int(logits.shape[0]) == 0:
        return logits.sum() * 0.0
    index = labels.astype("int64").reshape([-1, 1, 1, 1]).expand([-1, 1, logits.shape[2], logits.shape[3]])
    picked = paddle.take_along_axis(logits, index, axis=1)[:, 0]
    return F.binary_cross_entropy_with_logits(picked, targets.astype(picked.dtype), reduction="mean")
