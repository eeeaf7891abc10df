"""Region Proposal Network of Faster / Mask R-CNN (Ren et al. 2015).

A shared 3x3 conv + ReLU runs on every feature level, then two 1x1 convs predict, per anchor,
an objectness logit and 4 box deltas. Proposals come from Paddle's ``generate_proposals`` op
(decode, clip to the image, per-level top-k + NMS); with several levels (FPN) the survivors of
all levels are merged and the best ``post_nms_top_n`` by score are kept.

Training uses the same proposals with the training top-k settings the caller passes
(:meth:`RPNHead.train_proposals`) on the raw outputs of :meth:`RPNHead.head_outputs`; the losses against the anchor targets are in
:mod:`..losses.rcnn_loss`.

State-dict keys: ``rpn_feat.rpn_conv.*``, ``rpn_rois_score.*``, ``rpn_rois_delta.*``.
"""
from __future__ import annotations

import math
from typing import Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import Normal
from paddle.vision.ops import generate_proposals

__all__ = ["AnchorGenerator", "RPNFeat", "RPNHead"]


class AnchorGenerator(nn.Layer):
    """Anchors ``[H*W*A, 4]`` (x1, y1, x2, y2 in input pixels) for each feature level.

    ``anchor_sizes``: one list of sizes per level, or a single list shared by all levels;
    ``strides``: one per level. At each cell the A = len(sizes) * len(ratios) anchors are ordered
    size-major, ratio-minor; cells are row-major. ``offset`` 0 puts the anchor centre on the
    cell's top-left corner, as the official models were trained. No parameters.
    """

    def __init__(self, anchor_sizes: Sequence = (32, 64, 128, 256, 512),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), strides: Sequence[float] = (16.0,),
                 offset: float = 0.0):
        super().__init__()
        if not isinstance(anchor_sizes[0], (list, tuple)):
            anchor_sizes = [list(anchor_sizes)] * len(strides)
        if len(anchor_sizes) != len(strides):
            raise ValueError("need one list of anchor sizes per stride")
        self.strides = [float(s) for s in strides]
        self.offset = float(offset)
        # base anchors centred at 0, computed in float64 like the reference, stored as float32
        self.cell_anchors = [self._cell_anchors(sizes, aspect_ratios) for sizes in anchor_sizes]
        self.num_anchors = len(self.cell_anchors[0])

    @staticmethod
    def _cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> list[list[float]]:
        out = []
        for size in sizes:
            area = float(size) ** 2
            for r in ratios:
                w = math.sqrt(area / r)  # keeps the area and sets h / w = r
                h = r * w
                out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return out

    def forward(self, feats: Sequence[paddle.Tensor]) -> list[paddle.Tensor]:
        anchors = []
        for feat, stride, cell in zip(feats, self.strides, self.cell_anchors):
            shape = paddle.shape(feat)  # dynamic H, W so that exported graphs accept any size
            xs = paddle.arange(0, shape[3], dtype="float32") * stride + self.offset * stride
            ys = paddle.arange(0, shape[2], dtype="float32") * stride + self.offset * stride
            yy, xx = paddle.meshgrid(ys, xs)
            xx, yy = xx.reshape([-1]), yy.reshape([-1])
            shifts = paddle.stack([xx, yy, xx, yy], axis=1).reshape([-1, 1, 4])
            base = paddle.to_tensor(cell, dtype="float32").reshape([1, -1, 4])
            anchors.append((shifts + base).reshape([-1, 4]))
        return anchors


class RPNFeat(nn.Layer):
    """The 3x3 conv + ReLU shared by all levels (key ``rpn_conv``)."""

    def __init__(self, in_channel: int = 1024, out_channel: int = 1024):
        super().__init__()
        self.rpn_conv = nn.Conv2D(in_channel, out_channel, kernel_size=3, padding=1,
                                  weight_attr=paddle.ParamAttr(initializer=Normal(0.0, 0.01)))

    def forward(self, feats: Sequence[paddle.Tensor]) -> list[paddle.Tensor]:
        return [F.relu(self.rpn_conv(f)) for f in feats]


class RPNHead(nn.Layer):
    """RPN over ``feats`` (one or more levels) -> per-image proposals.

    ``forward(feats, im_shape)`` returns ``(rois, rois_num)``: a list with one ``[R_i, 4]``
    tensor per image (x1, y1, x2, y2 in input pixels, clipped to ``im_shape``, sorted by score
    when several levels are merged) and an int32 ``[B]`` tensor of the counts.

    Test-time proposal settings: ``pre_nms_top_n`` per level before NMS (IoU ``nms_thresh``),
    ``post_nms_top_n`` after NMS and again after merging levels; ``min_size`` 0 keeps every box.
    """

    def __init__(self, in_channel: int = 256, anchor_generator: AnchorGenerator | None = None,
                 pre_nms_top_n: int = 1000, post_nms_top_n: int = 1000, nms_thresh: float = 0.7,
                 min_size: float = 0.0):
        super().__init__()
        self.anchor_generator = anchor_generator or AnchorGenerator()
        num_anchors = self.anchor_generator.num_anchors
        self.rpn_feat = RPNFeat(in_channel, in_channel)
        self.rpn_rois_score = nn.Conv2D(in_channel, num_anchors, kernel_size=1,
                                        weight_attr=paddle.ParamAttr(initializer=Normal(0.0, 0.01)))
        self.rpn_rois_delta = nn.Conv2D(in_channel, 4 * num_anchors, kernel_size=1,
                                        weight_attr=paddle.ParamAttr(initializer=Normal(0.0, 0.01)))
        self.pre_nms_top_n = int(pre_nms_top_n)
        self.post_nms_top_n = int(post_nms_top_n)
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)

    def forward(self, feats: Sequence[paddle.Tensor], im_shape: paddle.Tensor
                ) -> tuple[list[paddle.Tensor], paddle.Tensor]:
        scores, deltas, anchors = self.head_outputs(feats)
        return self.proposals(scores, deltas, anchors, im_shape)

    def head_outputs(self, feats: Sequence[paddle.Tensor]
                     ) -> tuple[list[paddle.Tensor], list[paddle.Tensor], list[paddle.Tensor]]:
        """Per level: objectness logits ``[B, A, H, W]``, deltas ``[B, 4A, H, W]`` and anchors ``[H*W*A, 4]``."""
        rpn_feats = self.rpn_feat(feats)
        scores = [self.rpn_rois_score(f) for f in rpn_feats]
        deltas = [self.rpn_rois_delta(f) for f in rpn_feats]
        anchors = self.anchor_generator(rpn_feats)
        return scores, deltas, anchors

    def train_proposals(self, scores: list[paddle.Tensor], deltas: list[paddle.Tensor],
                        anchors: list[paddle.Tensor], im_shape: paddle.Tensor, *, pre_nms_top_n: int,
                        post_nms_top_n: int, topk_after_collect: bool
                        ) -> tuple[list[paddle.Tensor], paddle.Tensor]:
        """Proposals with training settings, on detached outputs (no gradient through them):
        ``pre_nms_top_n`` per level before NMS, ``post_nms_top_n`` after merging the levels; with
        ``topk_after_collect`` (FPN) each level keeps up to its pre-NMS count after NMS, otherwise
        (C4) it is cut to ``post_nms_top_n`` already."""
        level_top_n = pre_nms_top_n if topk_after_collect else post_nms_top_n
        with paddle.no_grad():
            return self.proposals([s.detach() for s in scores], [d.detach() for d in deltas], anchors, im_shape,
                                  pre_nms_top_n=pre_nms_top_n, level_post_nms_top_n=level_top_n,
                                  post_nms_top_n=post_nms_top_n)

    def proposals(self, scores: list[paddle.Tensor], deltas: list[paddle.Tensor],
                  anchors: list[paddle.Tensor], im_shape: paddle.Tensor, pre_nms_top_n: int | None = None,
                  level_post_nms_top_n: int | None = None, post_nms_top_n: int | None = None
                  ) -> tuple[list[paddle.Tensor], paddle.Tensor]:
        """Per-image proposals; the top-k settings default to the test ones (``level_post_nms_top_n``:
        the count each level keeps after NMS, ``post_nms_top_n``: after merging the levels)."""
        pre_nms_top_n = self.pre_nms_top_n if pre_nms_top_n is None else int(pre_nms_top_n)
        post_nms_top_n = self.post_nms_top_n if post_nms_top_n is None else int(post_nms_top_n)
        level_post_nms_top_n = post_nms_top_n if level_post_nms_top_n is None else int(level_post_nms_top_n)
        rois_list, nums = [], []
        for i in range(int(im_shape.shape[0])):
            level_rois, level_probs = [], []
            for score, delta, anchor in zip(scores, deltas, anchors):
                # deltas are plain (dx, dy, dw, dh): the RPN was trained with unit variances
                rois, probs, _ = generate_proposals(
                    score[i:i + 1], delta[i:i + 1], im_shape[i:i + 1], anchor, paddle.ones_like(anchor),
                    pre_nms_top_n=pre_nms_top_n, post_nms_top_n=level_post_nms_top_n,
                    nms_thresh=self.nms_thresh, min_size=self.min_size, eta=1.0, return_rois_num=True)
                level_rois.append(rois)
                level_probs.append(probs)
            if len(level_rois) == 1:
                rois = level_rois[0]
            else:
                # merge the levels: keep the post_nms_top_n best proposals overall
                rois = paddle.concat(level_rois)
                probs = paddle.concat(level_probs).flatten()
                if paddle.in_dynamic_mode():
                    if probs.shape[0] > post_nms_top_n:
                        _, keep = paddle.topk(probs, post_nms_top_n)
                        rois = paddle.gather(rois, keep)
                else:  # exported graph: the count is only known at run time
                    count = paddle.shape(probs)[0]
                    k = paddle.minimum(count, paddle.full_like(count, post_nms_top_n))
                    _, keep = paddle.topk(probs, k)
                    rois = paddle.gather(rois, keep)
            rois_list.append(rois)
            nums.append(paddle.shape(rois)[0:1])
        return rois_list, paddle.concat(nums).astype("int32")
