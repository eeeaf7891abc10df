"""Training targets of Mask R-CNN / Cascade Mask R-CNN: anchor labels, RoI sampling, mask targets.

The settings follow PaddleDetection's R-CNN configs (see :class:`RCNNTrainConfig`):

* **RPN anchors** (:func:`assign_anchors`): an anchor is foreground when its best IoU with a
  ground-truth box is >= 0.7, background when < 0.3, ignored in between; in addition every GT
  box claims the anchors that overlap it best (``allow_low_quality``), so that small or oddly
  shaped objects get a positive. 256 anchors per image are sampled at random, at most half of
  them foreground. Anchors crossing the image border are **not** ignored (as in PaddleDetection).
  Box targets are plain deltas (weights [1, 1, 1, 1]).
* **RoIs** (:func:`sample_rois`): the proposals plus the GT boxes; a RoI is foreground (the GT's
  class) when its IoU is >= 0.5, background (label ``num_classes``, the box head's last column)
  otherwise; 512 per image, at most 25 % foreground. Cascade stages 2 and 3 relabel every
  refined box with IoU thresholds 0.6 / 0.7 and do not sample.
* **Masks** (:func:`mask_targets`): each foreground RoI's GT mask is resampled into the RoI on an
  M x M grid by RoIAlign (aligned, adaptive sampling) and binarised at 0.5 (M = 28 for FPN
  models, 14 for the C4 model).

Everything here is target construction: no gradient flows through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import paddle
from paddle.vision.ops import roi_align

from instseg_core.modeling.losses.box_ops import box_iou

__all__ = ["RCNNTrainConfig", "AnchorTargets", "RoITargets", "encode_deltas", "match_boxes",
           "subsample_labels", "assign_anchors", "sample_rois", "mask_targets", "nonempty_boxes"]


@dataclass(frozen=True)
class RCNNTrainConfig:
    """The training settings of PaddleDetection's R-CNN configs (``*_fpn.yml``, C4 ``mask_rcnn_r50.yml``,
    ``cascade_mask_rcnn_r50_fpn.yml``); :func:`..mask_rcnn.mask_rcnn` picks the variant."""

    # RPN anchor targets (RPNTargetAssign)
    rpn_batch_size_per_im: int = 256
    rpn_fg_fraction: float = 0.5
    rpn_positive_overlap: float = 0.7
    rpn_negative_overlap: float = 0.3
    # training proposals (train_proposal); test settings live on the RPN head
    train_pre_nms_top_n: int = 2000
    train_post_nms_top_n: int = 1000
    # True: each FPN level keeps its pre-NMS count after NMS and only the merged list is cut to
    # post_nms_top_n; False (C4): every level is cut to post_nms_top_n after NMS
    topk_after_collect: bool = True
    # RoI sampling (BBoxAssigner)
    roi_batch_size_per_im: int = 512
    roi_fg_fraction: float = 0.25
    roi_fg_thresh: float = 0.5
    roi_bg_thresh: float = 0.5
    # cascade: IoU threshold of each stage (stage 1 uses it for fg and bg alike) and loss weights
    cascade_iou: tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_stage_loss_weights: tuple[float, ...] = (1.0 / 3, 1.0 / 3, 1.0 / 3)
    # mask targets (MaskAssigner)
    mask_resolution: int = 28


@dataclass
class AnchorTargets:
    """RPN targets of one image: ``labels`` [A] int32 (1 sampled fg, 0 sampled bg, -1 not sampled)
    and ``deltas`` [A, 4] float32 (encoding of each anchor's matched GT box, zeros without GT)."""

    labels: paddle.Tensor
    deltas: paddle.Tensor


@dataclass
class RoITargets:
    """Sampled RoIs of one image and their targets.

    ``rois`` [R, 4] (x1, y1, x2, y2, input pixels); ``labels`` [R] int64: a class for foreground,
    ``num_classes`` for background (-1 never occurs with the default thresholds);
    ``gt_index`` [R] int64: the matched GT (meaningful for foreground only); ``gt_boxes`` [R, 4]:
    that GT's box (zeros when the image has no GT).
    """

    rois: paddle.Tensor
    labels: paddle.Tensor
    gt_index: paddle.Tensor
    gt_boxes: paddle.Tensor

    def foreground(self, num_classes: int) -> paddle.Tensor:
        """Indices [P] of the foreground RoIs."""
        fg = paddle.logical_and(self.labels >= 0, self.labels < num_classes)
        return paddle.nonzero(fg).reshape([-1])


def encode_deltas(boxes: paddle.Tensor, targets: paddle.Tensor, weights: Sequence[float]) -> paddle.Tensor:
    """Regression targets ``[N, 4]`` = (dx, dy, dw, dh) that move ``boxes`` onto ``targets``
    (both [N, 4] x1, y1, x2, y2), scaled by ``weights``; the inverse of
    :func:`..heads.roi_heads.delta2bbox` (up to its dw/dh clip)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + 0.5 * w
    cy = boxes[:, 1] + 0.5 * h
    tw = targets[:, 2] - targets[:, 0]
    th = targets[:, 3] - targets[:, 1]
    tcx = targets[:, 0] + 0.5 * tw
    tcy = targets[:, 1] + 0.5 * th
    wx, wy, ww, wh = weights
    return paddle.stack([wx * (tcx - cx) / w, wy * (tcy - cy) / h,
                         ww * paddle.log(tw / w), wh * paddle.log(th / h)], axis=1)


def match_boxes(iou: paddle.Tensor, positive_overlap: float, negative_overlap: float,
                allow_low_quality: bool) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Match each box (column of ``iou`` [G, N], G >= 1) to its best GT.

    Returns ``(matches [N] int64, labels [N] int32)``: label 1 when the best IoU is >=
    ``positive_overlap``, 0 when it is < ``negative_overlap``, -1 in between. With
    ``allow_low_quality`` every box that is some GT's best match (IoU > 0, ties included) is
    made positive too; it keeps its own best GT as match.
    """
    best_iou = iou.max(axis=0)
    matches = iou.argmax(axis=0)
    labels = paddle.full(best_iou.shape, -1, dtype="int32")
    labels = paddle.where(best_iou < negative_overlap, paddle.zeros_like(labels), labels)
    labels = paddle.where(best_iou >= positive_overlap, paddle.ones_like(labels), labels)
    if allow_low_quality:
        best_per_gt = iou.max(axis=1, keepdim=True)
        is_best = paddle.logical_and(iou > 0, iou == best_per_gt).astype("int32").sum(axis=0) > 0
        labels = paddle.where(is_best, paddle.ones_like(labels), labels)
    return matches, labels


def subsample_labels(labels: paddle.Tensor, num_samples: int, fg_fraction: float,
                     bg_label: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Random sample of at most ``num_samples`` indices: foreground (labels not -1 and not
    ``bg_label``) up to ``int(num_samples * fg_fraction)``, background (``bg_label``) filling the
    rest. Returns ``(fg_inds, bg_inds)`` int64. Uses Paddle's global generator (``paddle.seed``)."""
    fg = paddle.nonzero(paddle.logical_and(labels != -1, labels != bg_label)).reshape([-1])
    bg = paddle.nonzero(labels == bg_label).reshape([-1])
    num_fg = min(int(fg.shape[0]), int(num_samples * fg_fraction))
    num_bg = min(int(bg.shape[0]), num_samples - num_fg)
    return _random_subset(fg, num_fg), _random_subset(bg, num_bg)


def _random_subset(indices: paddle.Tensor, k: int) -> paddle.Tensor:
    if k == 0:
        return paddle.zeros([0], dtype="int64")
    if k == int(indices.shape[0]):
        return indices
    return paddle.gather(indices, paddle.randperm(int(indices.shape[0]), dtype="int64")[:k])


def assign_anchors(anchors: paddle.Tensor, gt_boxes: paddle.Tensor, batch_size_per_im: int = 256,
                   fg_fraction: float = 0.5, positive_overlap: float = 0.7,
                   negative_overlap: float = 0.3) -> AnchorTargets:
    """RPN targets of one image for ``anchors`` [A, 4] and its ``gt_boxes`` [G, 4] (G may be 0:
    every anchor is then a background candidate)."""
    num_anchors = int(anchors.shape[0])
    if int(gt_boxes.shape[0]) == 0:
        match_labels = paddle.zeros([num_anchors], dtype="int32")
        deltas = paddle.zeros([num_anchors, 4], dtype="float32")
    else:
        iou = box_iou(gt_boxes, anchors, pairwise=True)
        matches, match_labels = match_boxes(iou, positive_overlap, negative_overlap, allow_low_quality=True)
        deltas = encode_deltas(anchors, paddle.gather(gt_boxes, matches), (1.0, 1.0, 1.0, 1.0))
    fg_inds, bg_inds = subsample_labels(match_labels, batch_size_per_im, fg_fraction, bg_label=0)
    labels = paddle.full([num_anchors], -1, dtype="int32")
    if bg_inds.shape[0] > 0:
        labels = paddle.scatter(labels, bg_inds, paddle.zeros(bg_inds.shape, dtype="int32"))
    if fg_inds.shape[0] > 0:
        labels = paddle.scatter(labels, fg_inds, paddle.ones(fg_inds.shape, dtype="int32"))
    return AnchorTargets(labels=labels.detach(), deltas=deltas.detach())


def sample_rois(proposals: paddle.Tensor, gt_boxes: paddle.Tensor, gt_labels: paddle.Tensor,
                num_classes: int, batch_size_per_im: int = 512, fg_fraction: float = 0.25,
                fg_thresh: float = 0.5, bg_thresh: float = 0.5, add_gt_as_proposals: bool = True,
                subsample: bool = True) -> RoITargets:
    """Label (and sample) the RoIs of one image.

    ``proposals`` [R, 4] (detached), ``gt_boxes`` [G, 4], ``gt_labels`` [G] int64 (G may be 0).
    With ``add_gt_as_proposals`` the GT boxes join the candidates. A candidate is foreground when
    its best IoU is >= ``fg_thresh``, background when < ``bg_thresh`` (ignored in between). With
    ``subsample`` (the first stage) at most ``batch_size_per_im`` are kept, foreground first;
    without it (cascade stages 2 and 3) all candidates are kept in their order.
    """
    proposals = proposals.detach()
    num_gt = int(gt_boxes.shape[0])
    boxes = paddle.concat([proposals, gt_boxes]) if add_gt_as_proposals and num_gt > 0 else proposals
    n = int(boxes.shape[0])
    if num_gt == 0:
        matches = paddle.zeros([n], dtype="int64")
        labels = paddle.full([n], num_classes, dtype="int64")
    else:
        iou = box_iou(gt_boxes, boxes, pairwise=True)
        matches, match_labels = match_boxes(iou, fg_thresh, bg_thresh, allow_low_quality=False)
        labels = paddle.gather(gt_labels.astype("int64"), matches)
        labels = paddle.where(match_labels == 0, paddle.full_like(labels, num_classes), labels)
        labels = paddle.where(match_labels == -1, paddle.full_like(labels, -1), labels)
    if subsample:
        fg_inds, bg_inds = subsample_labels(labels, batch_size_per_im, fg_fraction, bg_label=num_classes)
        keep = paddle.concat([fg_inds, bg_inds])
        boxes, labels, matches = paddle.gather(boxes, keep), paddle.gather(labels, keep), paddle.gather(matches, keep)
    matched = paddle.gather(gt_boxes, matches) if num_gt > 0 else paddle.zeros([int(boxes.shape[0]), 4])
    return RoITargets(rois=boxes.detach(), labels=labels.detach(), gt_index=matches.detach(),
                      gt_boxes=matched.detach())


def nonempty_boxes(boxes: paddle.Tensor) -> paddle.Tensor:
    """Indices [K] int64 of the boxes with positive width and height."""
    keep = paddle.logical_and(boxes[:, 2] > boxes[:, 0], boxes[:, 3] > boxes[:, 1])
    return paddle.nonzero(keep).reshape([-1])


def mask_targets(gt_masks: paddle.Tensor, rois: paddle.Tensor, gt_index: paddle.Tensor,
                 resolution: int = 28) -> paddle.Tensor:
    """Binary mask targets [P, M, M] float32 of RoIs ``rois`` [P, 4] (input pixels) whose GT is
    ``gt_index`` [P] into ``gt_masks`` [G, H, W] (0/1 at input resolution).

    The GT mask is averaged on an M x M grid over the RoI (RoIAlign, half-pixel aligned, adaptive
    sampling: the same sampling as the mask head's features) and thresholded at 0.5.
    """
    num = int(rois.shape[0])
    if num == 0:
        return paddle.zeros([0, resolution, resolution], dtype="float32")
    # roi_align takes the boxes grouped by "image": here one image per GT mask
    order = paddle.argsort(gt_index, stable=True)
    counts = paddle.bincount(gt_index, minlength=int(gt_masks.shape[0])).astype("int32")
    pooled = roi_align(gt_masks.astype("float32").unsqueeze(1), paddle.gather(rois, order), counts,
                       resolution, spatial_scale=1.0, sampling_ratio=0, aligned=True)[:, 0]
    restore = paddle.argsort(order)
    return (paddle.gather(pooled, restore) >= 0.5).astype("float32").detach()
