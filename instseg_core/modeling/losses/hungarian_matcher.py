"""One-to-one assignment of predictions to ground truth (DETR's bipartite matching).

Per image the cost of pairing query ``q`` with object ``j`` is a weighted sum of

* a focal-style class cost: focal loss of predicting ``label_j`` as positive minus the focal loss
  of predicting it as negative (low when ``sigmoid(logit)`` of that class is high);
* L1 distance of the normalised (cx, cy, w, h) boxes;
* ``-GIoU`` of the boxes;
* mask BCE and dice costs (as in Mask2Former / MaskDINO). The reference estimates them on 12544
  random points per image; here they are computed densely on the prediction's own grid (stride 4,
  e.g. 80x80 for a 320 input), against the ground truth area-averaged onto that grid (the fraction
  of each cell the object covers, which is what uniform point samples average to). Same quantity,
  no sampling noise, and much cheaper on CPU than ``grid_sample`` at 12544 points.

``scipy.optimize.linear_sum_assignment`` then picks the cheapest matching: min(Q, n) pairs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from scipy.optimize import linear_sum_assignment

from instseg_core.modeling.losses.box_ops import cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "MatchIndices"]

# (query indices, target indices) of one image, both int64 and of equal length
MatchIndices = tuple[np.ndarray, np.ndarray]


def _empty_match() -> MatchIndices:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


class HungarianMatcher:
    """``matcher(logits, boxes, masks, targets) -> [(query_idx, target_idx)] * B``.

    ``logits`` [B, Q, C], ``boxes`` [B, Q, 4] (normalised cxcywh), ``masks`` [B, Q, h, w] logits
    or None (no mask costs); ``targets``: per image ``labels`` [n], ``boxes`` [n, 4] normalised
    cxcywh, ``masks`` [n, H, W] 0/1.
    """

    def __init__(self, cost_class: float = 4.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 cost_mask: float = 5.0, cost_dice: float = 5.0, alpha: float = 0.25,
                 gamma: float = 2.0):
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.cost_mask, self.cost_dice = cost_mask, cost_dice
        self.alpha, self.gamma = alpha, gamma

    @paddle.no_grad()
    def __call__(self, logits: paddle.Tensor, boxes: paddle.Tensor, masks: paddle.Tensor | None,
                 targets: Sequence[dict[str, paddle.Tensor]]) -> list[MatchIndices]:
        out = []
        for b, tgt in enumerate(targets):
            if int(tgt["labels"].shape[0]) == 0:
                out.append(_empty_match())
                continue
            cost = self.cost_matrix(logits[b], boxes[b], None if masks is None else masks[b], tgt)
            q, j = linear_sum_assignment(cost.numpy())
            out.append((q.astype(np.int64), j.astype(np.int64)))
        return out

    def cost_matrix(self, logits: paddle.Tensor, boxes: paddle.Tensor, masks: paddle.Tensor | None,
                    tgt: dict[str, paddle.Tensor]) -> paddle.Tensor:
        """[Q, n] matching cost of one image (inputs without the batch dimension)."""
        prob = paddle.gather(F.sigmoid(logits), tgt["labels"], axis=1)  # [Q, n]
        pos = self.alpha * (1 - prob) ** self.gamma * -paddle.log(prob + 1e-8)
        neg = (1 - self.alpha) * prob ** self.gamma * -paddle.log(1 - prob + 1e-8)
        cost = self.cost_class * (pos - neg)

        cost += self.cost_bbox * (boxes.unsqueeze(1) - tgt["boxes"].unsqueeze(0)).abs().sum(-1)
        giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt["boxes"]), pairwise=True)
        cost += self.cost_giou * -giou

        if masks is not None and (self.cost_mask or self.cost_dice):
            cost += self._mask_cost(masks, tgt["masks"])
        return cost

    def _mask_cost(self, masks: paddle.Tensor, gt_masks: paddle.Tensor) -> paddle.Tensor:
        h, w = int(masks.shape[-2]), int(masks.shape[-1])
        x = masks.reshape([-1, h * w])  # [Q, hw] logits
        t = gt_masks.astype(x.dtype).unsqueeze(0)
        if tuple(t.shape[-2:]) != (h, w):
            t = F.interpolate(t, size=[h, w], mode="area")
        t = t.reshape([-1, h * w])  # [n, hw] coverage in [0, 1]
        # mean BCE over the grid for every (query, object) pair, via two matmuls
        bce = (paddle.matmul(F.softplus(-x), t, transpose_y=True)
               + paddle.matmul(F.softplus(x), 1 - t, transpose_y=True)) / (h * w)
        s = F.sigmoid(x)
        dice = 1 - (2 * paddle.matmul(s, t, transpose_y=True) + 1) / (
            s.sum(-1, keepdim=True) + t.sum(-1).unsqueeze(0) + 1)
        return self.cost_mask * bce + self.cost_dice * dice
