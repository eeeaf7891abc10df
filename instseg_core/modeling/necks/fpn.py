"""Feature Pyramid Network (Lin et al. 2017) as used by the R-CNN family and SOLOv2.

Usage::

    from instseg_core.modeling.backbones.resnet import resnet50
    from instseg_core.modeling.necks.fpn import FPN

    backbone = resnet50()                                  # res2..res5, [256, 512, 1024, 2048] channels
    neck = FPN(in_channels=backbone.out_channels)          # out_channel=256, 5 levels
    p2, p3, p4, p5, p6 = neck(backbone(image))             # strides 4, 8, 16, 32, 64

No normalisation; P6 is a stride-2 max-pool (kernel 1) of P5, so input sides must be multiples
of 32. State-dict keys: ``fpn_inner_res{2,3,4}_sum_lateral.*``, ``fpn_inner_res5_sum.*`` (the 1x1
laterals, with bias) and ``fpn_res{2..5}_sum.*`` (the 3x3 output convs).
"""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

__all__ = ["FPN"]


class FPN(nn.Layer):
    """Top-down pyramid: 1x1 laterals, nearest x2 upsampling + add, 3x3 output convs, then
    ``extra_stage`` extra levels by max-pooling the coarsest output (only 0 or 1 supported).

    ``in_channels`` are the channels of the consecutive backbone stages ending at res5
    (``[C2, C3, C4, C5]`` by default); ``out_strides`` gives the strides of the outputs.
    """

    def __init__(self, in_channels: Sequence[int] = (256, 512, 1024, 2048), out_channel: int = 256,
                 extra_stage: int = 1):
        super().__init__()
        if extra_stage not in (0, 1):
            raise ValueError("only extra_stage 0 or 1 (a max-pooled P6) is supported")
        self.out_channel = out_channel
        self.extra_stage = extra_stage
        first = 4 - len(in_channels)  # stage index of the first input (0 = res2)
        self.lateral_convs: list[nn.Conv2D] = []
        self.fpn_convs: list[nn.Conv2D] = []
        for i, c_in in enumerate(in_channels):
            level = first + i + 2
            lateral_name = "fpn_inner_res5_sum" if level == 5 else f"fpn_inner_res{level}_sum_lateral"
            self.lateral_convs.append(self.add_sublayer(lateral_name, nn.Conv2D(c_in, out_channel, 1)))
            self.fpn_convs.append(self.add_sublayer(
                f"fpn_res{level}_sum", nn.Conv2D(out_channel, out_channel, 3, padding=1)))
        self.out_strides = [2 ** (first + i + 2) for i in range(len(in_channels) + extra_stage)]

    @property
    def out_channels(self) -> list[int]:
        return [self.out_channel] * len(self.out_strides)

    def forward(self, feats: Sequence[paddle.Tensor]) -> list[paddle.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        # top-down: add the upsampled coarser level to each finer lateral
        for lvl in range(len(laterals) - 1, 0, -1):
            laterals[lvl - 1] = laterals[lvl - 1] + F.interpolate(laterals[lvl], scale_factor=2.0, mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        if self.extra_stage:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs
