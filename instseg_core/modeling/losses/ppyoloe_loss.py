"""PP-YOLOE-seg training losses: varifocal classification, GIoU + DFL boxes, prototype masks.

All box quantities of the head live in stride units ("grid units": an anchor point is its cell
centre ``i + 0.5`` and distances are multiples of the level's stride). The assigner works in
input pixels; its boxes are divided by the anchor's stride before the box losses.

The total follows the PP-YOLOE-seg recipe: ``1.0 * cls + 2.5 * iou + 0.5 * dfl + 2.5 * mask``
(the reference scales the mask term with its ``iou`` weight). The class and box terms are divided
by the sum of the soft class targets (at least 1); the mask term is the mean over positive anchors
(the reference divides it by the soft-target sum too, which made it diverge from scratch: see
``_positive_terms``). ``loss_l1`` is reported for monitoring only.
"""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn.functional as F

from instseg_core.modeling.losses.box_ops import generalized_box_iou
from instseg_core.modeling.losses.distributed import mean_over_ranks
from instseg_core.modeling.losses.task_aligned_assigner import Assignment, TaskAlignedAssigner

DEFAULT_WEIGHTS = {"cls": 1.0, "iou": 2.5, "dfl": 0.5, "mask": 2.5}


# ------------------------------------------------------------------------------- elementary losses
def varifocal_loss(logits: paddle.Tensor, target_score: paddle.Tensor, label: paddle.Tensor,
                   alpha: float = 0.75, gamma: float = 2.0) -> paddle.Tensor:
    """Sum of the varifocal loss (Zhang et al. 2021) over all anchors and classes.

    BCE of ``sigmoid(logits)`` against the IoU-aware ``target_score``. Positives (``label`` 1) are
    weighted by their target, so high-quality matches count more; negatives by
    ``alpha * p**gamma``, which down-weights the many easy background predictions.
    """
    p = F.sigmoid(logits)
    weight = alpha * p.pow(gamma) * (1.0 - label) + target_score * label
    bce = F.binary_cross_entropy_with_logits(logits, target_score, reduction="none")
    return (bce * weight).sum()


def distribution_focal_loss(reg_logits: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    """DFL (Li et al. 2020) per box, averaged over its 4 sides: ``[N,4,R+1]`` logits, ``[N,4]`` -> ``[N]``.

    A continuous target ``t`` in ``[0, R)`` is the mix of its two neighbouring bins
    ``floor(t)`` and ``floor(t)+1``; the loss is their cross-entropy weighted by proximity.
    """
    left = paddle.floor(target)
    w_left = left + 1.0 - target
    logp = F.log_softmax(reg_logits, axis=-1)
    left_i = left.astype("int64").unsqueeze(-1)
    nll_left = -paddle.take_along_axis(logp, left_i, axis=-1).squeeze(-1)
    nll_right = -paddle.take_along_axis(logp, left_i + 1, axis=-1).squeeze(-1)
    return (nll_left * w_left + nll_right * (1.0 - w_left)).mean(axis=-1)


def ltrb_targets(points: paddle.Tensor, boxes: paddle.Tensor, reg_max: int) -> paddle.Tensor:
    """Distances ``[N,4]`` from points ``[N,2]`` to the sides of boxes ``[N,4]``, clipped to the DFL range.

    The upper clip ``reg_max - 0.01`` keeps the right neighbour bin ``floor(t) + 1 <= reg_max``.
    """
    lt = points - boxes[:, :2]
    rb = boxes[:, 2:] - points
    return paddle.concat([lt, rb], axis=-1).clip(0.0, reg_max - 0.01)


def downsample_masks(masks: paddle.Tensor, size_hw: tuple[int, int]) -> paddle.Tensor:
    """Instance masks ``[n,H,W]`` averaged over the integer blocks that map onto ``size_hw``.

    Each prototype pixel covers a ``factor x factor`` block of input pixels (bilinear upsampling
    of the prototypes puts its centre at the block's centre), so the target is the block's
    coverage in [0,1]: a soft target that BCE accepts, and no half-block shift as nearest has.
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    fh, fw = int(masks.shape[1]) // h, int(masks.shape[2]) // w
    if fh * h != masks.shape[1] or fw * w != masks.shape[2]:
        raise ValueError(f"mask size {tuple(masks.shape[1:])} is not a multiple of {(h, w)}")
    if masks.shape[0] == 0:
        return paddle.zeros([0, h, w], dtype=masks.dtype)
    return F.avg_pool2d(masks.unsqueeze(1), kernel_size=[fh, fw], stride=[fh, fw]).squeeze(1)


def box_crop(boxes: paddle.Tensor, size_hw: tuple[int, int]) -> paddle.Tensor:
    """``[N,h,w]`` 0/1 float: pixel ``(r, c)`` with ``x1 <= c < x2`` and ``y1 <= r < y2`` of each box.

    The same pixel-index rule as the inference-time mask crop.
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    x1, y1, x2, y2 = [v.reshape([-1, 1, 1]) for v in boxes.unbind(-1)]
    cols = paddle.arange(w, dtype=boxes.dtype).reshape([1, 1, w])
    rows = paddle.arange(h, dtype=boxes.dtype).reshape([1, h, 1])
    return ((cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)).astype(boxes.dtype)


def prototype_mask_loss(coefs: paddle.Tensor, protos: paddle.Tensor, gt_masks: paddle.Tensor,
                        boxes: paddle.Tensor) -> paddle.Tensor:
    """Per-positive mask loss ``[P]``: BCE of ``coefs @ protos`` inside the GT box / box area.

    coefs [P,M] mask coefficients, protos [M,h,w], gt_masks [P,h,w] targets and boxes [P,4] the
    GT boxes, all at prototype resolution. Only the box interior counts (the inference mask is
    cropped to the box too), and dividing by the area makes small and large objects weigh alike.
    """
    m, h, w = protos.shape
    logits = paddle.matmul(coefs, protos.reshape([m, h * w])).reshape([-1, h, w])
    bce = F.binary_cross_entropy_with_logits(logits, gt_masks, reduction="none")
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clip(min=1e-6)
    return (bce * box_crop(boxes, (h, w))).sum(axis=[1, 2]) / area


# ------------------------------------------------------------------------------- batch targets
def pad_targets(targets: Sequence[dict[str, paddle.Tensor]]
                ) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Stack per-image ``labels``/``boxes`` into ``[B,n]`` labels, ``[B,n,4]`` boxes, ``[B,n]`` valid.

    ``n`` is the largest instance count; shorter images are padded with label 0, a zero box and
    ``valid`` False.
    """
    n = max([int(t["labels"].shape[0]) for t in targets] + [0])
    labels, boxes, valid = [], [], []
    for t in targets:
        k = int(t["labels"].shape[0])
        pad = n - k
        lab = t["labels"].astype("int64").reshape([k])
        box = t["boxes"].astype("float32").reshape([k, 4])
        if pad:
            lab = paddle.concat([lab, paddle.zeros([pad], dtype="int64")])
            box = paddle.concat([box, paddle.zeros([pad, 4], dtype="float32")])
        labels.append(lab)
        boxes.append(box)
        valid.append(paddle.arange(n) < k)
    return paddle.stack(labels), paddle.stack(boxes), paddle.stack(valid)


# ------------------------------------------------------------------------------- the criterion
class PPYOLOESegLoss:
    """``criterion(outputs, targets, input_hw) -> {"loss", "loss_cls", "loss_iou", "loss_dfl",
    "loss_mask", "loss_l1"}`` (scalar tensors).

    ``outputs`` are the head's training outputs (``PPYOLOEInsHead.forward_train``): cls_logits
    [B,A,C], reg_logits [B,A,4,R+1], distances [B,A,4] (the DFL expectation), coefs [B,A,M],
    protos [B,M,h,w], anchor_points [A,2] and strides [A,1]. ``targets`` follow
    ``instseg_core.training.data`` (pixel xyxy boxes and input-resolution masks).
    """

    def __init__(self, num_classes: int, reg_max: int = 16,
                 assigner: TaskAlignedAssigner | None = None,
                 weights: dict[str, float] | None = None,
                 vfl_alpha: float = 0.75, vfl_gamma: float = 2.0):
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.assigner = assigner or TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0)
        self.weights = dict(DEFAULT_WEIGHTS, **(weights or {}))
        self.vfl_alpha = vfl_alpha
        self.vfl_gamma = vfl_gamma

    def __call__(self, outputs, targets: Sequence[dict[str, paddle.Tensor]],
                 input_hw: tuple[int, int]) -> dict[str, paddle.Tensor]:
        cls_logits, reg_logits, distances, coefs, protos, points, strides = outputs
        if len(targets) != cls_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {cls_logits.shape[0]} images")
        c = self.num_classes
        lt, rb = paddle.split(distances, 2, axis=-1)
        pred_boxes = paddle.concat([points - lt, points + rb], axis=-1)  # grid units

        gt_labels, gt_boxes, gt_valid = pad_targets(targets)
        if int(gt_labels.shape[1]) and int(gt_labels.max()) >= c:
            raise ValueError(f"a target label is >= num_classes ({c})")
        assign = self.assigner(F.sigmoid(cls_logits).detach(), pred_boxes.detach() * strides,
                               points * strides, gt_labels, gt_boxes, gt_valid)

        onehot = F.one_hot(assign.labels, c + 1)[..., :c].astype(cls_logits.dtype)
        loss_cls = varifocal_loss(cls_logits, assign.scores, onehot, self.vfl_alpha, self.vfl_gamma)
        # one normaliser for every term: the total soft-target mass (>= 1 so empty batches work),
        # averaged over data-parallel ranks so N workers train as one process with N x the batch
        norm = mean_over_ranks(assign.scores.sum()).clip(min=1.0)
        num_pos = mean_over_ranks(assign.positive.astype("float32").sum()).clip(min=1.0)
        terms = {"loss_cls": loss_cls / norm}
        terms.update(self._positive_terms(assign, reg_logits, pred_boxes, coefs, protos, points,
                                          strides, targets, input_hw, norm, num_pos))
        w = self.weights
        terms["loss"] = (w["cls"] * terms["loss_cls"] + w["iou"] * terms["loss_iou"]
                         + w["dfl"] * terms["loss_dfl"] + w["mask"] * terms["loss_mask"])
        return terms

    def _positive_terms(self, assign: Assignment, reg_logits, pred_boxes, coefs, protos, points,
                        strides, targets, input_hw, norm, num_pos) -> dict[str, paddle.Tensor]:
        """Box (GIoU, DFL, L1) and mask terms, which only positive anchors have."""
        b, a = assign.positive.shape
        pos = paddle.nonzero(assign.positive.reshape([-1])).reshape([-1])
        if pos.shape[0] == 0:
            # zero, but still connected to every output so all parameters get (zero) gradients
            zero = 0.0 * (reg_logits.sum() + coefs.sum() + protos.sum())
            return {"loss_iou": zero, "loss_dfl": zero, "loss_mask": zero, "loss_l1": zero}

        stride_pos = paddle.gather(strides.tile([b, 1]), pos)  # [P,1]
        point_pos = paddle.gather(points.tile([b, 1]), pos)
        weight = paddle.gather(assign.scores.sum(-1).reshape([-1]), pos)  # soft target per positive
        box_pos = paddle.gather(pred_boxes.reshape([-1, 4]), pos)
        target_pos = paddle.gather(assign.boxes.reshape([-1, 4]), pos) / stride_pos

        loss_iou = ((1.0 - generalized_box_iou(box_pos, target_pos)) * weight).sum() / norm
        reg_pos = paddle.gather(reg_logits.reshape([b * a, 4, -1]), pos)
        ltrb = ltrb_targets(point_pos, target_pos, self.reg_max)
        loss_dfl = (distribution_focal_loss(reg_pos, ltrb) * weight).sum() / norm
        loss_l1 = (box_pos - target_pos).abs().mean()

        # mean over positives, not / norm: early in training the soft targets sum to ~0 and
        # dividing the (unweighted) mask sum by them blew the loss up (observed: 1e6 by step 8)
        loss_mask = self._mask_term(assign, coefs, protos, targets, input_hw).sum() / num_pos
        return {"loss_iou": loss_iou, "loss_dfl": loss_dfl, "loss_mask": loss_mask,
                "loss_l1": loss_l1}

    @staticmethod
    def _mask_term(assign: Assignment, coefs, protos, targets, input_hw) -> paddle.Tensor:
        """Sum over positive anchors of :func:`prototype_mask_loss`, image by image."""
        h, w = int(protos.shape[2]), int(protos.shape[3])
        scale = paddle.to_tensor([w / input_hw[1], h / input_hw[0]] * 2, dtype="float32")
        losses: list[paddle.Tensor] = []
        for i, t in enumerate(targets):
            pos = paddle.nonzero(assign.positive[i]).reshape([-1])
            if pos.shape[0] == 0:
                continue
            gt_idx = paddle.gather(assign.gt_index[i], pos)
            gt_masks = paddle.gather(downsample_masks(t["masks"].astype("float32"), (h, w)), gt_idx)
            boxes = paddle.gather(assign.boxes[i], pos) * scale  # input pixels -> prototype pixels
            losses.append(prototype_mask_loss(paddle.gather(coefs[i], pos), protos[i], gt_masks,
                                              boxes).sum())
        return paddle.add_n(losses)
