"""Set-prediction losses of Mask-RT-DETR (MaskDINO-style: DETR + varifocal + point-sampled masks).

For one set of predictions (logits [B,Q,C], boxes [B,Q,4] normalised cxcywh, mask logits
[B,Q,h,w]) and an assignment query -> object:

* class: varifocal loss (IoU-aware; Zhang et al. 2021): a matched query's target score for its
  class is the IoU of its prediction with the object (detached), every other entry is 0 and
  weighted by ``alpha * p**gamma`` (as focal loss down-weights easy negatives). Sigmoid focal loss
  when ``use_vfl`` is off;
* box: L1 on normalised cxcywh and ``1 - GIoU``;
* mask: BCE and dice on ``num_points`` points per matched mask, chosen by uncertainty (the
  Mask2Former / PointRend importance sampling), read bilinearly from the stride-4 prediction and
  the input-resolution ground truth.

Every term is summed over the batch and divided by the number of objects (min 1).

``MaskDINOLoss`` applies this to every prediction set of the training forward: the last decoder
layer gives ``loss_<term>``; the encoder top-k proposals, the decoder input and the other decoder
layers (each matched on its own) are summed into ``loss_<term>_aux``; the denoising queries use
the known assignment and give ``loss_<term>_dn`` / ``loss_<term>_aux_dn``, normalised by
``num_objects * num_groups``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from instseg_core.modeling.losses.box_ops import box_iou, cxcywh_to_xyxy, generalized_box_iou
from instseg_core.modeling.losses.denoising import DenoisingGroup
from instseg_core.modeling.losses.distributed import mean_over_ranks
from instseg_core.modeling.losses.hungarian_matcher import HungarianMatcher, MatchIndices
from instseg_core.modeling.losses.point_sample import point_sample, uncertain_points

__all__ = ["SetPrediction", "MaskDINOLoss", "varifocal_loss", "sigmoid_focal_loss", "dice_loss",
           "mask_iou", "TERMS"]

TERMS = ("class", "bbox", "giou", "mask", "dice")


class SetPrediction(NamedTuple):
    """One set of query predictions."""

    logits: paddle.Tensor  # [B, Q, C]
    boxes: paddle.Tensor  # [B, Q, 4] normalised cxcywh in [0, 1]
    masks: paddle.Tensor  # [B, Q, h, w] logits


# ---------------------------------------------------------------- element-wise losses
def varifocal_loss(logits: paddle.Tensor, score: paddle.Tensor, label: paddle.Tensor,
                   alpha: float = 0.75, gamma: float = 2.0) -> paddle.Tensor:
    """Element-wise VFL: BCE(logits, score) weighted by ``score`` on positives (``label`` 1) and
    by ``alpha * sigmoid(logits)**gamma`` on negatives."""
    p = F.sigmoid(logits)
    weight = alpha * p.pow(gamma) * (1 - label) + score * label
    return F.binary_cross_entropy_with_logits(logits, score, reduction="none") * weight


def sigmoid_focal_loss(logits: paddle.Tensor, label: paddle.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> paddle.Tensor:
    """Element-wise focal loss (Lin et al. 2017) of binary ``label`` (0/1 floats)."""
    p = F.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    p_t = p * label + (1 - p) * (1 - label)
    alpha_t = alpha * label + (1 - alpha) * (1 - label)
    return alpha_t * (1 - p_t) ** gamma * ce


def dice_loss(logits: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
    """Per-row dice loss ``1 - (2|s t| + 1) / (|s| + |t| + 1)`` of [N, P] logits vs [N, P] targets."""
    s = F.sigmoid(logits)
    return 1 - (2 * (s * targets).sum(-1) + 1) / (s.sum(-1) + targets.sum(-1) + 1)


@paddle.no_grad()
def mask_iou(mask_logits: paddle.Tensor, gt_masks: paddle.Tensor) -> paddle.Tensor:
    """IoU [N] of predicted masks [N, h, w] (logit > 0, upsampled x2) with 0/1 masks [N, H, W]
    (resized to the same grid, > 0.5); +0.01 on both sides keeps empty pairs finite."""
    pred = F.interpolate(mask_logits.unsqueeze(0), scale_factor=2.0, mode="bilinear",
                         align_corners=False)[0] > 0
    gt = F.interpolate(gt_masks.astype(mask_logits.dtype).unsqueeze(0), size=pred.shape[-2:],
                       mode="bilinear", align_corners=False)[0] > 0.5
    pred, gt = pred.astype("float32").flatten(1), gt.astype("float32").flatten(1)
    inter = (pred * gt).sum(-1)
    union = pred.sum(-1) + gt.sum(-1) - inter
    return (inter + 0.01) / (union + 0.01)


def _zero() -> paddle.Tensor:
    return paddle.zeros([], "float32")


# ---------------------------------------------------------------- the criterion
class MaskDINOLoss:
    """``criterion(predictions, targets, dn_predictions, dn_group) -> {"loss", "loss_class", ...}``.

    ``predictions``: matching-query sets, last = final decoder layer; ``dn_predictions``: the
    denoising-query sets (same order) or None. ``targets``: per image ``labels`` [n] int64,
    ``boxes`` [n, 4] normalised cxcywh, ``masks`` [n, H, W] 0/1.
    ``vfl_iou_type`` ("mask" or "bbox") is the IoU of the final sets' VFL targets; the auxiliary
    sets always use box IoU (as the reference does: cheaper, and they are only auxiliary).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None,
                 weights: dict[str, float] | None = None, use_vfl: bool = True,
                 vfl_iou_type: str = "mask", num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_ratio: float = 0.75):
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = dict(weights or {"class": 4.0, "bbox": 5.0, "giou": 2.0, "mask": 5.0, "dice": 5.0})
        assert vfl_iou_type in ("mask", "bbox")
        self.use_vfl, self.vfl_iou_type = use_vfl, vfl_iou_type
        self.num_points, self.oversample_ratio, self.importance_ratio = (
            num_points, oversample_ratio, importance_ratio)

    def __call__(self, predictions: Sequence[SetPrediction], targets: Sequence[dict[str, paddle.Tensor]],
                 dn_predictions: Sequence[SetPrediction] | None = None,
                 dn_group: DenoisingGroup | None = None) -> dict[str, paddle.Tensor]:
        # objects per batch, averaged over data-parallel ranks (N workers train as one process)
        num_objects = max(float(mean_over_ranks(float(sum(int(t["labels"].shape[0]) for t in targets)))), 1.0)
        losses = self._over_sets(predictions, targets, num_objects, None, "")
        if dn_group is not None and dn_predictions is not None:
            losses.update(self._over_sets(dn_predictions, targets, num_objects * dn_group.num_groups,
                                          dn_group.match_indices(), "_dn"))
        else:  # nothing to denoise (no object in the batch): keep the keys stable
            losses.update({f"{k}_dn": _zero() for k in list(losses)})
        losses["loss"] = paddle.add_n(list(losses.values()))
        return losses

    def _over_sets(self, sets: Sequence[SetPrediction], targets, num_objects: float,
                   indices: list[MatchIndices] | None, postfix: str) -> dict[str, paddle.Tensor]:
        """Final set -> ``loss_<t><postfix>``, the others summed -> ``loss_<t>_aux<postfix>``."""
        out = {}
        aux = {t: [] for t in TERMS}
        for k, pred in enumerate(sets):
            final = k == len(sets) - 1
            match = indices if indices is not None else self.matcher(pred.logits, pred.boxes, pred.masks, targets)
            terms = self.set_loss(pred, targets, match, num_objects,
                                  iou_type=self.vfl_iou_type if final else "bbox")
            for t in TERMS:
                if final:
                    out[f"loss_{t}{postfix}"] = terms[t]
                else:
                    aux[t].append(terms[t])
        for t in TERMS:
            out[f"loss_{t}_aux{postfix}"] = paddle.add_n(aux[t]) if aux[t] else _zero()
        return out

    def set_loss(self, pred: SetPrediction, targets, match: list[MatchIndices], num_objects: float,
                 iou_type: str = "bbox") -> dict[str, paddle.Tensor]:
        """The five weighted terms of one prediction set under a given assignment."""
        bsz, nq, nc = (int(s) for s in pred.logits.shape)
        flat = np.concatenate([b * nq + q for b, (q, _) in enumerate(match)]).astype(np.int64)
        labels = np.concatenate([targets[b]["labels"].numpy()[j] for b, (_, j) in enumerate(match)])
        w = self.weights
        if len(flat) == 0:
            cls = self._class_loss(pred.logits, flat, labels, None, num_objects)
            return {"class": w["class"] * cls, "bbox": _zero(), "giou": _zero(), "mask": _zero(),
                    "dice": _zero()}

        idx = paddle.to_tensor(flat)
        src_boxes = paddle.gather(pred.boxes.reshape([-1, 4]), idx)
        tgt_boxes = paddle.concat([paddle.gather(t["boxes"], paddle.to_tensor(j))
                                   for t, (_, j) in zip(targets, match) if len(j)])
        h, wd = int(pred.masks.shape[-2]), int(pred.masks.shape[-1])
        src_masks = paddle.gather(pred.masks.reshape([-1, h, wd]), idx)
        tgt_masks = paddle.concat([paddle.gather(t["masks"], paddle.to_tensor(j))
                                   for t, (_, j) in zip(targets, match) if len(j)]).astype(src_masks.dtype)

        if iou_type == "mask":
            iou = mask_iou(src_masks.detach(), tgt_masks)
        else:
            iou = box_iou(cxcywh_to_xyxy(src_boxes.detach()), cxcywh_to_xyxy(tgt_boxes))
        cls = self._class_loss(pred.logits, flat, labels, iou, num_objects)

        l1 = (src_boxes - tgt_boxes).abs().sum() / num_objects
        giou = (1 - generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes))).sum() / num_objects

        points = uncertain_points(src_masks, self.num_points, self.oversample_ratio, self.importance_ratio)
        x = point_sample(src_masks, points)
        t = point_sample(tgt_masks, points).detach()
        bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(-1).sum() / num_objects
        dice = dice_loss(x, t).sum() / num_objects
        return {"class": w["class"] * cls, "bbox": w["bbox"] * l1, "giou": w["giou"] * giou,
                "mask": w["mask"] * bce, "dice": w["dice"] * dice}

    def _class_loss(self, logits: paddle.Tensor, flat: np.ndarray, labels: np.ndarray,
                    iou: paddle.Tensor | None, num_objects: float) -> paddle.Tensor:
        bsz, nq, nc = (int(s) for s in logits.shape)
        onehot = np.zeros([bsz * nq, nc], np.float32)
        onehot[flat, labels] = 1.0
        label = paddle.to_tensor(onehot.reshape([bsz, nq, nc]))
        if not self.use_vfl:
            return sigmoid_focal_loss(logits, label).sum() / num_objects
        score = np.zeros([bsz * nq, nc], np.float32)
        if iou is not None and len(flat):
            score[flat, labels] = iou.numpy()
        score = paddle.to_tensor(score.reshape([bsz, nq, nc]))
        return varifocal_loss(logits, score, label).sum() / num_objects
