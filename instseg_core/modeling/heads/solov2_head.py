"""SOLOv2 heads (Wang et al. 2020, "SOLOv2: Dynamic and Fast Instance Segmentation").

Two heads share the FPN outputs P2..P6:

* :class:`SOLOv2Head` predicts, for every cell of an S x S grid per level, a category score map
  (category branch) and the weights of a dynamic 1x1 conv (kernel branch, with CoordConv input).
* :class:`SOLOv2MaskHead` builds the unified mask feature at stride 4 from P2..P5; the dynamic
  kernels of the cells are applied to it to give the instance masks (see ``..solov2``).

Written from the reference notes (``shared/reference/ppdet_models.md`` section 2.3) and checked
against the oracle features ``feat/mask_head`` and ``feat/solov2_head/{0,1}/*``.

State-dict contract (the official ``.pdparams`` names): the head's convs are registered under
``bbox_head.kernel_convs.{i}``, ``bbox_head.cate_convs.{i}``, ``bbox_head.solo_kernel`` and
``bbox_head.solo_cate``; the last two are reachable under ``solo_kernel`` / ``solo_cate`` as well
(the official files list both names for the same tensors). The mask head registers each level
``conv_pre_feat{i}`` with convs named ``mask_feat_head.convs_all_levels.{i}.conv{j}``, and its
output conv as both ``mask_feat_head.conv_pred.0`` and ``conv_pred``. Do not rename these.
"""
from __future__ import annotations

import math
from typing import Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

__all__ = ["ConvGNLayer", "SOLOv2Head", "SOLOv2MaskHead", "coord_features", "points_nms"]


class ConvGNLayer(nn.Layer):
    """Conv2D (no bias, 'same' padding) -> GroupNorm(32). Keys ``conv.weight``, ``norm.{weight,bias}``.

    The activation is applied by the caller (ReLU everywhere in SOLOv2).
    """

    def __init__(self, ch_in: int, ch_out: int, filter_size: int = 3, num_groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2D(ch_in, ch_out, kernel_size=filter_size, padding=(filter_size - 1) // 2,
                              bias_attr=False)
        self.norm = nn.GroupNorm(num_groups=num_groups, num_channels=ch_out)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.norm(self.conv(x))


def coord_features(x: paddle.Tensor) -> paddle.Tensor:
    """CoordConv channels for NCHW ``x``: ``[N, 2, H, W]``, normalised x then y in [-1, 1].

    They give the translation-invariant convs a sense of absolute position, which the kernel
    branch needs to tell instances at different grid cells apart. Built from the runtime shape
    (exported graphs take any input size).
    """
    shape = paddle.shape(x)
    xs = paddle.linspace(-1.0, 1.0, shape[3], dtype="float32").reshape([1, 1, 1, -1])
    ys = paddle.linspace(-1.0, 1.0, shape[2], dtype="float32").reshape([1, 1, -1, 1])
    zero = paddle.zeros_like(x[:, :1])  # [N, 1, H, W]; adding 0 keeps the values exact
    return paddle.concat([zero + xs, zero + ys], axis=1)


def points_nms(heat: paddle.Tensor, kernel_size: int = 2) -> paddle.Tensor:
    """Keep a score only where it is the maximum of its 2x2 window (the cell and its up/left
    neighbours); the others become 0. A cheap NMS between adjacent grid cells."""
    hmax = F.max_pool2d(heat, kernel_size=kernel_size, stride=1, padding=1)
    keep = paddle.cast(hmax[:, :, :-1, :-1] == heat, "float32")
    return heat * keep


class SOLOv2Head(nn.Layer):
    """Kernel and category branches over the five pyramid levels.

    ``forward(feats)`` takes P2..P6 and returns ``(cate_maps, kernel_maps)``, one entry per level:
    in eval mode the category maps are sigmoid scores after :func:`points_nms`, channel-last
    ``[N, S, S, num_classes]``; in training mode they are the raw logits ``[N, num_classes, S, S]``
    (what the focal loss takes). The kernel maps are ``[N, kernel_out_channels, S, S]`` in both.
    """

    def __init__(self, num_classes: int = 80, in_channels: int = 256, seg_feat_channels: int = 512,
                 stacked_convs: int = 4, num_grids: Sequence[int] = (40, 36, 24, 16, 12),
                 kernel_out_channels: int = 256, segm_strides: Sequence[int] = (8, 8, 16, 32, 32),
                 score_threshold: float = 0.1, mask_threshold: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.num_grids = [int(s) for s in num_grids]
        self.kernel_out_channels = kernel_out_channels
        # area below which a mask is dropped at inference, per level
        self.segm_strides = [int(s) for s in segm_strides]
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold

        # Plain lists: the layers are registered under their official dotted names below.
        self.kernel_convs: list[ConvGNLayer] = []
        self.cate_convs: list[ConvGNLayer] = []
        for i in range(stacked_convs):
            # the kernel branch sees the two coordinate channels, the category branch does not
            k_in = in_channels + 2 if i == 0 else seg_feat_channels
            c_in = in_channels if i == 0 else seg_feat_channels
            self.kernel_convs.append(self.add_sublayer(
                f"bbox_head.kernel_convs.{i}", ConvGNLayer(k_in, seg_feat_channels)))
            self.cate_convs.append(self.add_sublayer(
                f"bbox_head.cate_convs.{i}", ConvGNLayer(c_in, seg_feat_channels)))

        kernel = nn.Conv2D(seg_feat_channels, kernel_out_channels, 3, padding=1,
                           weight_attr=nn.initializer.Normal(std=0.01))
        # focal-loss prior: initial foreground probability 0.01
        prior = -math.log((1 - 0.01) / 0.01)
        cate = nn.Conv2D(seg_feat_channels, num_classes, 3, padding=1,
                         weight_attr=nn.initializer.Normal(std=0.01),
                         bias_attr=nn.initializer.Constant(prior))
        # One layer, two names (official state dicts carry both).
        self.add_sublayer("bbox_head.solo_kernel", kernel)
        self.solo_kernel = kernel
        self.add_sublayer("bbox_head.solo_cate", cate)
        self.solo_cate = cate

    @staticmethod
    def split_feats(feats: Sequence[paddle.Tensor]) -> tuple[paddle.Tensor, ...]:
        """P2 halved and P6 brought up to P5's size, so the five levels sit at strides
        8, 8, 16, 32, 32 (bilinear, align_corners False)."""
        p2, p3, p4, p5, p6 = feats
        p2 = F.interpolate(p2, scale_factor=0.5, mode="bilinear", align_corners=False, align_mode=0)
        p6 = F.interpolate(p6, size=paddle.shape(p5)[2:], mode="bilinear", align_corners=False,
                           align_mode=0)
        return p2, p3, p4, p5, p6

    def forward_level(self, feat: paddle.Tensor, grid: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Raw (category logits ``[N, C, S, S]``, kernels ``[N, E, S, S]``) of one level."""
        # CoordConv, then resample to the S x S grid: each cell predicts one instance
        kernel_feat = paddle.concat([feat, coord_features(feat)], axis=1)
        kernel_feat = F.interpolate(kernel_feat, size=[grid, grid], mode="bilinear",
                                    align_corners=False, align_mode=0)
        cate_feat = kernel_feat[:, :-2]  # the category branch drops the coordinates
        for conv in self.kernel_convs:
            kernel_feat = F.relu(conv(kernel_feat))
        for conv in self.cate_convs:
            cate_feat = F.relu(conv(cate_feat))
        return self.solo_cate(cate_feat), self.solo_kernel(kernel_feat)

    def forward(self, feats: Sequence[paddle.Tensor]) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        cate_maps, kernel_maps = [], []
        for feat, grid in zip(self.split_feats(feats), self.num_grids):
            cate, kernel = self.forward_level(feat, grid)
            if not self.training:
                cate = points_nms(F.sigmoid(cate), kernel_size=2).transpose([0, 2, 3, 1])
            cate_maps.append(cate)
            kernel_maps.append(kernel)
        return cate_maps, kernel_maps


class _MaskFeatLevel(nn.Layer):
    """One level of the mask-feature head: ``level`` x [3x3 ConvGN, ReLU, bilinear x2], which
    brings stride 4 * 2**level to stride 4. The first (finest) level is one ConvGN and no
    upsampling; its ReLU is applied by the caller.

    The convs are registered as ``mask_feat_head.convs_all_levels.{level}.conv{j}``.
    """

    def __init__(self, level: int, ch_in: int, mid_channels: int, first: bool):
        super().__init__()
        self.upsample = not first
        self.convs: list[ConvGNLayer] = []
        for j in range(1 if first else level):
            conv = ConvGNLayer(ch_in if j == 0 else mid_channels, mid_channels)
            self.convs.append(self.add_sublayer(f"mask_feat_head.convs_all_levels.{level}.conv{j}", conv))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not self.upsample:
            return self.convs[0](x)
        for conv in self.convs:
            x = F.relu(conv(x))
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False, align_mode=0)
        return x


class SOLOv2MaskHead(nn.Layer):
    """Unified mask feature: level i of P2..P5 goes through i (ConvGN, ReLU, x2 upsampling)
    steps to stride 4 (P2: one ConvGN), the levels are summed, and a 1x1 ConvGN + ReLU gives
    ``out_channels`` channels. P5 gets CoordConv channels first, so the mask feature carries
    position as the dynamic kernels expect.

    ``forward(feats)`` takes at least P2..P5 and returns ``[N, out_channels, H/4, W/4]``.
    """

    def __init__(self, in_channels: int = 256, mid_channels: int = 128, out_channels: int = 256,
                 start_level: int = 0, end_level: int = 3):
        super().__init__()
        if not 0 <= start_level <= end_level:
            raise ValueError(f"need 0 <= start_level <= end_level, got {start_level}, {end_level}")
        self.start_level, self.end_level = start_level, end_level
        self.levels: list[_MaskFeatLevel] = []
        for i in range(start_level, end_level + 1):
            ch_in = in_channels + 2 if i == end_level and i != start_level else in_channels
            self.levels.append(self.add_sublayer(
                f"conv_pre_feat{i}", _MaskFeatLevel(i, ch_in, mid_channels, first=i == start_level)))
        pred = ConvGNLayer(mid_channels, out_channels, filter_size=1)
        # One layer, two names (official state dicts carry both).
        self.add_sublayer("mask_feat_head.conv_pred.0", pred)
        self.conv_pred = pred

    def forward(self, feats: Sequence[paddle.Tensor]) -> paddle.Tensor:
        inputs = list(feats)[self.start_level:self.end_level + 1]
        out = F.relu(self.levels[0](inputs[0]))
        for k in range(1, len(self.levels)):
            x = inputs[k]
            if k == len(self.levels) - 1:
                x = paddle.concat([x, coord_features(x)], axis=1)
            out = out + self.levels[k](x)
        return F.relu(self.conv_pred(out))
