"""SOLOv2 training: grid targets from instance masks, dice mask loss and focal category loss.

Target assignment (as PaddleDetection's ``Gt2Solov2Target`` for solov2_r50_fpn_1x), per image and
per level of the five-level grid ``num_grids = (40, 36, 24, 16, 12)``:

* an instance goes to every level whose scale range ``[lo, hi]`` (both ends inclusive) holds
  ``sqrt(w * h)`` of its box; ranges ``(1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)``
  overlap, so an instance may train two levels;
* its centre is the centre of mass of its mask (mean pixel row/column index); the positive cells
  are the cells touched by the centre region -- the box scaled by ``coord_sigma = 0.2`` around the
  centre -- clamped to the 3 x 3 neighbourhood of the centre's cell (the grid spans the whole,
  padded, input);
* each positive cell gets the instance's category (a later instance overwrites an earlier one)
  and one (cell, mask) pair whose target is the instance mask at the mask-feature resolution
  (stride 4). A cell covered by two instances keeps both pairs, as the reference does.

Losses (``SOLOv2Loss`` of the reference): the dice loss of ``sigmoid(kernel * mask_feature)``
against the mask target, averaged over the pairs whose target is not empty, times
``ins_weight = 3.0``; the sigmoid focal loss (gamma 2, alpha 0.25) of the category logits of every
cell against the one-hot categories, summed and divided by the number of positive cells + 1. The
total is ``loss_ins + loss_cate`` (``loss_ins`` is reported with its weight, as the reference logs
it). Both normalisers are averaged over data-parallel ranks (:func:`.distributed.mean_over_ranks`),
so N workers of batch b train as one process of batch N*b.

Category maps here use 0 for background and ``class + 1`` for a class, as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from instseg_core.modeling.losses.distributed import mean_over_ranks

__all__ = ["LevelTargets", "SOLOv2Loss", "SCALE_RANGES", "centre_cell_region", "dice_loss",
           "downsample_mask_targets", "image_targets"]

SCALE_RANGES: tuple[tuple[float, float], ...] = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))


@dataclass
class LevelTargets:
    """Targets of one image at one grid level.

    ``cate`` int64 [S*S]: 0 background, ``class + 1`` at positive cells (row-major cells);
    ``cells`` int64 [P]: the cell of each (cell, mask) pair; ``masks`` float32 [P, h, w]: the mask
    target of each pair at the mask-feature resolution.
    """

    cate: np.ndarray
    cells: np.ndarray
    masks: np.ndarray

    @property
    def num_positive_cells(self) -> int:
        return int(np.count_nonzero(self.cate))


def downsample_mask_targets(masks: np.ndarray, stride: int) -> np.ndarray:
    """Masks ``[n, H, W]`` (0/1) -> ``[n, H // stride, W // stride]`` float32 0/1.

    A target pixel is 1 when at least half of its ``stride x stride`` block is foreground. (The
    reference resizes the uint8 mask bilinearly by 1/stride, which samples the block's middle; the
    block majority is the same idea, less sensitive to a one-pixel shift.) ``H`` and ``W`` must be
    multiples of ``stride``.
    """
    n, h, w = masks.shape
    if h % stride or w % stride:
        raise ValueError(f"mask size {(h, w)} is not a multiple of the stride {stride}")
    blocks = masks.reshape(n, h // stride, stride, w // stride, stride).astype(np.float32)
    return (blocks.mean(axis=(2, 4)) >= 0.5).astype(np.float32)


def centre_cell_region(centre_yx: tuple[float, float], half_hw: tuple[float, float],
                       input_hw: tuple[int, int], grid: int) -> tuple[int, int, int, int]:
    """Inclusive cell rows/columns ``(top, bottom, left, right)`` of an ``grid x grid`` grid over
    an ``input_hw`` image that the centre region covers.

    The region is ``centre +- half_hw`` (pixels), converted to cells by ``floor(coord / size * grid)``
    and clamped to the grid and to the 3 x 3 neighbourhood of the centre's own cell.
    """
    (cy, cx), (hh, hw) = centre_yx, half_hw
    h, w = input_hw

    def cell(v: float, size: int) -> int:
        return int(np.floor(v / size * grid))

    ci, cj = min(cell(cy, h), grid - 1), min(cell(cx, w), grid - 1)
    top = max(0, cell(cy - hh, h), ci - 1)
    bottom = min(grid - 1, cell(cy + hh, h), ci + 1)
    left = max(0, cell(cx - hw, w), cj - 1)
    right = min(grid - 1, cell(cx + hw, w), cj + 1)
    return top, bottom, left, right


def image_targets(labels: np.ndarray, boxes: np.ndarray, masks: np.ndarray, num_grids: Sequence[int],
                  scale_ranges: Sequence[tuple[float, float]] = SCALE_RANGES, coord_sigma: float = 0.2,
                  mask_stride: int = 4) -> list[LevelTargets]:
    """SOLOv2 targets of one image, one :class:`LevelTargets` per level (see the module docstring).

    ``labels`` int [n] (0..C-1), ``boxes`` [n, 4] x1, y1, x2, y2 and ``masks`` [n, H, W] 0/1 in
    network-input pixels (the padded size). Instances with an empty mask are skipped.
    """
    n = int(len(labels))
    h, w = int(masks.shape[1]), int(masks.shape[2])
    feat_hw = (h // mask_stride, w // mask_stride)
    boxes = np.asarray(boxes, np.float64).reshape(n, 4)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    scales = np.sqrt(np.clip(bw * bh, 0.0, None))
    binary = np.asarray(masks) > 0.5

    # centres of mass and stride-4 targets, computed once for the instances any level takes
    taken = np.zeros(n, bool)
    for lo, hi in scale_ranges:
        taken |= (scales >= lo) & (scales <= hi)
    areas = binary.reshape(n, h * w).sum(axis=1)
    taken &= areas > 0
    idx = np.nonzero(taken)[0]
    centres = {}
    for i in idx:
        ys, xs = np.nonzero(binary[i])
        centres[int(i)] = (float(ys.mean()), float(xs.mean()))
    small = downsample_mask_targets(binary[idx], mask_stride) if len(idx) else None
    small_of = {int(i): k for k, i in enumerate(idx)}

    out: list[LevelTargets] = []
    for (lo, hi), grid in zip(scale_ranges, num_grids):
        cate = np.zeros([grid, grid], np.int64)
        cells: list[int] = []
        pair_masks: list[int] = []
        for i in idx:
            if not lo <= scales[i] <= hi:
                continue
            half = (0.5 * bh[i] * coord_sigma, 0.5 * bw[i] * coord_sigma)
            top, bottom, left, right = centre_cell_region(centres[int(i)], half, (h, w), grid)
            cate[top:bottom + 1, left:right + 1] = int(labels[i]) + 1
            for r in range(top, bottom + 1):
                for c in range(left, right + 1):
                    cells.append(r * grid + c)
                    pair_masks.append(small_of[int(i)])
        target = small[pair_masks] if cells else np.zeros([0, *feat_hw], np.float32)
        out.append(LevelTargets(cate.reshape(-1), np.asarray(cells, np.int64), target))
    return out


def dice_loss(probs: paddle.Tensor, target: paddle.Tensor, eps: float = 0.001) -> paddle.Tensor:
    """Per-row dice loss ``1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 2 eps)`` of ``[P, ...]`` tensors.

    0 for identical binary masks (up to ``eps``), 1 for disjoint ones.
    """
    p = probs.reshape([probs.shape[0], -1])
    t = target.reshape([target.shape[0], -1])
    inter = (p * t).sum(axis=1)
    denom = (p * p).sum(axis=1) + eps + (t * t).sum(axis=1) + eps
    return 1.0 - 2.0 * inter / denom


class SOLOv2Loss:
    """``loss(cate_logits, kernel_maps, mask_feat, targets)`` -> ``{'loss', 'loss_ins', 'loss_cate'}``.

    ``cate_logits`` / ``kernel_maps``: per level ``[B, C, S, S]`` / ``[B, E, S, S]`` (the head's
    training outputs); ``mask_feat`` ``[B, E, H/4, W/4]``; ``targets`` the batch's list of dicts
    (``labels``, ``boxes``, ``masks`` at the padded input size, see ``instseg_core.training.data``).
    """

    def __init__(self, num_classes: int, num_grids: Sequence[int],
                 scale_ranges: Sequence[tuple[float, float]] = SCALE_RANGES, coord_sigma: float = 0.2,
                 ins_weight: float = 3.0, focal_gamma: float = 2.0, focal_alpha: float = 0.25,
                 cate_weight: float = 1.0, mask_stride: int = 4):
        if len(scale_ranges) != len(num_grids):
            raise ValueError(f"{len(scale_ranges)} scale ranges for {len(num_grids)} grid levels")
        self.num_classes = num_classes
        self.num_grids = [int(s) for s in num_grids]
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.coord_sigma = coord_sigma
        self.ins_weight = ins_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.cate_weight = cate_weight
        self.mask_stride = mask_stride

    def build_targets(self, targets: Sequence[Mapping[str, paddle.Tensor]]) -> list[list[LevelTargets]]:
        """Per image, per level :class:`LevelTargets` (numpy; runs on the host)."""
        out = []
        for t in targets:
            labels = np.asarray(t["labels"].numpy() if isinstance(t["labels"], paddle.Tensor) else t["labels"])
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"a target label is outside 0..{self.num_classes - 1}")
            boxes = t["boxes"].numpy() if isinstance(t["boxes"], paddle.Tensor) else t["boxes"]
            masks = t["masks"].numpy() if isinstance(t["masks"], paddle.Tensor) else t["masks"]
            out.append(image_targets(labels.reshape(-1), boxes, masks, self.num_grids, self.scale_ranges,
                                     self.coord_sigma, self.mask_stride))
        return out

    def __call__(self, cate_logits: Sequence[paddle.Tensor], kernel_maps: Sequence[paddle.Tensor],
                 mask_feat: paddle.Tensor, targets: Sequence[Mapping[str, paddle.Tensor]]
                 ) -> dict[str, paddle.Tensor]:
        batch = int(mask_feat.shape[0])
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch} images")
        feat_hw = (int(mask_feat.shape[2]), int(mask_feat.shape[3]))
        level_targets = self.build_targets(targets)
        got = level_targets[0][0].masks.shape[1:] if batch else feat_hw
        if tuple(got) != feat_hw:
            raise ValueError(f"mask targets of size {tuple(got)} do not match the mask feature {feat_hw}")

        loss_ins = self._instance_loss(kernel_maps, mask_feat, level_targets)
        loss_cate = self._category_loss(cate_logits, level_targets)
        return {"loss": loss_ins + loss_cate, "loss_ins": loss_ins, "loss_cate": loss_cate}

    def _instance_loss(self, kernel_maps: Sequence[paddle.Tensor], mask_feat: paddle.Tensor,
                       level_targets: list[list[LevelTargets]]) -> paddle.Tensor:
        """Weighted dice loss of the positive pairs, mean over the pairs with a non-empty target."""
        dims = int(mask_feat.shape[1])
        flat_kernels = [k.reshape([k.shape[0], dims, -1]).transpose([0, 2, 1]) for k in kernel_maps]  # [B,SS,E]
        losses, num_pairs = [], 0.0
        for b, per_level in enumerate(level_targets):
            kernels, masks = [], []
            for lvl, lt in enumerate(per_level):
                if len(lt.cells):
                    kernels.append(paddle.gather(flat_kernels[lvl][b], paddle.to_tensor(lt.cells)))
                    masks.append(lt.masks)
            if not kernels:
                continue
            target = np.concatenate(masks)
            valid = target.reshape(len(target), -1).any(axis=1)
            if not valid.any():
                continue
            # dynamic 1x1 conv of every pair's kernel over this image's mask feature
            logits = paddle.matmul(paddle.concat(kernels), mask_feat[b].reshape([dims, -1]))
            dice = dice_loss(F.sigmoid(logits), paddle.to_tensor(target.reshape(len(target), -1)))
            losses.append((dice * paddle.to_tensor(valid.astype(np.float32))).sum())
            num_pairs += float(valid.sum())
        norm = mean_over_ranks(num_pairs).clip(min=1.0)
        if not losses:
            # zero, but connected to the kernel and mask-feature outputs (every parameter gets a gradient)
            return 0.0 * (paddle.add_n([k.sum() for k in kernel_maps]) + mask_feat.sum())
        return self.ins_weight * paddle.add_n(losses) / norm

    def _category_loss(self, cate_logits: Sequence[paddle.Tensor],
                       level_targets: list[list[LevelTargets]]) -> paddle.Tensor:
        """Sigmoid focal loss over every cell and class / (positive cells + 1)."""
        c = self.num_classes
        logits = paddle.concat([m.transpose([0, 2, 3, 1]).reshape([-1, c]) for m in cate_logits])
        # same order as the logits: level, then image, then cell
        labels = np.concatenate([level_targets[b][lvl].cate for lvl in range(len(cate_logits))
                                 for b in range(len(level_targets))])
        num_pos = float(np.count_nonzero(labels))
        onehot = F.one_hot(paddle.to_tensor(labels), c + 1)[:, 1:].astype(logits.dtype)
        norm = (mean_over_ranks(num_pos) + 1.0).reshape([1])
        loss = F.sigmoid_focal_loss(logits, onehot, normalizer=norm, alpha=self.focal_alpha,
                                    gamma=self.focal_gamma, reduction="sum")
        return self.cate_weight * loss
