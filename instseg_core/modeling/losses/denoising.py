"""Denoising query groups (DN-DETR / DINO) for DETR-style training.

Besides the matching queries, the decoder gets noised copies of the ground truth: the label
embedding of a (sometimes randomly flipped) class as content, and a jittered box as reference.
They must reconstruct the original object, and since their target is known no matching is needed.

Layout: every image's objects are padded to ``max_gt`` slots (pad class = ``num_classes``, whose
embedding is a zero row, box = 0). A *group* is one noised copy of all slots; ``G =
max(num_denoising // max_gt, 1)`` groups are concatenated before the matching queries.

* plain denoising (Mask-RT-DETR's ``get_denoising_training_group``): a group is ``max_gt`` queries;
  boxes move by ``U(-1, 1) * box_noise_scale * (w/2, h/2, w, h)`` on (cx, cy, w, h);
* contrastive denoising (DINO / RT-DETR): a group is ``max_gt`` positive then ``max_gt`` negative
  queries; every xyxy corner moves by ``+-r * box_noise_scale * (w/2, h/2)`` with ``r`` in [0, 1)
  for positives and [1, 2) for negatives, clipped to [0, 1]. Negatives must be predicted as
  background (they are never assigned to an object).

Attention mask (True = may attend): matching queries see only matching queries (so they behave as
at inference), and each denoising group sees itself and the matching queries but no other group
(other groups would leak the answer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import paddle

from instseg_core.modeling.losses.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh

__all__ = ["DenoisingGroup", "build_denoising_group", "denoising_attn_mask"]


@dataclass
class DenoisingGroup:
    queries: paddle.Tensor  # [B, Nd, D] label embeddings (padding slots: zeros)
    ref_boxes: paddle.Tensor  # [B, Nd, 4] noised normalised cxcywh (may leave [0, 1]; not clipped)
    attn_mask: paddle.Tensor  # bool [Nd + Q, Nd + Q], True = may attend
    num_groups: int
    max_gt: int
    contrastive: bool
    num_gts: list[int]  # real objects per image

    @property
    def num_queries(self) -> int:
        """Nd: denoising queries per image."""
        return int(self.queries.shape[1])

    @property
    def group_size(self) -> int:
        return self.max_gt * (2 if self.contrastive else 1)

    def match_indices(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image (query idx, object idx) of the positive queries: object ``j`` is slot ``j`` of
        every group (the negatives in the second half of a contrastive group stay unassigned)."""
        out = []
        for n in self.num_gts:
            slots = np.arange(n, dtype=np.int64)
            q = np.concatenate([g * self.group_size + slots for g in range(self.num_groups)])
            out.append((q.astype(np.int64), np.tile(slots, self.num_groups)))
        return out


def denoising_attn_mask(num_denoising: int, group_size: int, num_queries: int) -> np.ndarray:
    """bool [Nd + Q, Nd + Q] self-attention mask (True = may attend), see the module doc."""
    allow = np.ones([num_denoising + num_queries] * 2, dtype=bool)
    allow[num_denoising:, :num_denoising] = False  # matching part cannot see the denoising part
    for start in range(0, num_denoising, group_size):
        end = start + group_size
        allow[start:end, :start] = False  # nor can a group see the other groups
        allow[start:end, end:num_denoising] = False
    return allow


def build_denoising_group(labels: Sequence[paddle.Tensor], boxes: Sequence[paddle.Tensor],
                          class_embed: paddle.Tensor, num_queries: int, num_denoising: int = 100,
                          label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                          contrastive: bool = False) -> DenoisingGroup | None:
    """Noised ground-truth queries of a batch; None when there is nothing to denoise.

    ``labels``: per image int64 [n]; ``boxes``: per image [n, 4] normalised cxcywh;
    ``class_embed``: [num_classes, D] label embedding (gradients reach it); ``num_queries``: the
    matching queries that follow (for the attention mask). Randomness comes from paddle's RNG.
    """
    num_gts = [int(t.shape[0]) for t in labels]
    max_gt = max(num_gts, default=0)
    if num_denoising <= 0 or max_gt == 0:
        return None
    num_classes, dim = int(class_embed.shape[0]), int(class_embed.shape[1])
    bsz = len(num_gts)
    num_groups = max(num_denoising // max_gt, 1)
    copies = num_groups * (2 if contrastive else 1)  # max_gt-slot blocks in the sequence

    cls = np.full([bsz, max_gt], num_classes, np.int64)
    box = np.zeros([bsz, max_gt, 4], np.float32)
    real = np.zeros([bsz, max_gt], bool)
    for i, n in enumerate(num_gts):
        if n:
            cls[i, :n] = labels[i].numpy().reshape(-1)
            box[i, :n] = boxes[i].numpy().reshape(n, 4)
            real[i, :n] = True
    nd = max_gt * copies
    cls_t = paddle.to_tensor(np.tile(cls, [1, copies]))
    box_t = paddle.to_tensor(np.tile(box, [1, copies, 1]))
    real_t = paddle.to_tensor(np.tile(real, [1, copies]))

    if label_noise_ratio > 0:
        # half of the noise ratio: a flipped label may land on the true class again
        flip = paddle.logical_and(paddle.rand([bsz, nd]) < label_noise_ratio * 0.5, real_t)
        cls_t = paddle.where(flip, paddle.randint(0, num_classes, [bsz, nd], dtype="int64"), cls_t)

    if box_noise_scale > 0:
        wh = box_t[..., 2:]
        if contrastive:
            negative = np.zeros([1, nd, 1], np.float32)
            for g in range(num_groups):
                negative[:, (2 * g + 1) * max_gt:(2 * g + 2) * max_gt] = 1.0
            diff = paddle.concat([wh, wh], axis=-1) * 0.5 * box_noise_scale
            sign = paddle.randint(0, 2, box_t.shape).astype("float32") * 2.0 - 1.0
            mag = paddle.rand(box_t.shape) + paddle.to_tensor(negative)  # [0,1) pos, [1,2) neg
            xyxy = (cxcywh_to_xyxy(box_t) + sign * mag * diff).clip(0.0, 1.0)
            box_t = xyxy_to_cxcywh(xyxy)
        else:
            diff = paddle.concat([wh * 0.5, wh], axis=-1) * box_noise_scale
            box_t = box_t + (paddle.rand(box_t.shape) * 2.0 - 1.0) * diff

    table = paddle.concat([class_embed, paddle.zeros([1, dim], class_embed.dtype)], axis=0)
    queries = paddle.gather(table, cls_t.reshape([-1]), axis=0).reshape([bsz, nd, dim])
    attn = paddle.to_tensor(denoising_attn_mask(nd, nd // num_groups, num_queries))
    return DenoisingGroup(queries=queries, ref_boxes=box_t, attn_mask=attn, num_groups=num_groups,
                          max_gt=max_gt, contrastive=contrastive, num_gts=num_gts)
