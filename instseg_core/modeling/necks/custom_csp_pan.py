"""CustomCSPPAN neck of PP-YOLOE (no transformer branch)."""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn as nn

from instseg_core.modeling.layers import SPP, ActLike, BasicBlock, ConvBNLayer, get_activation
from instseg_core.modeling.resize import upsample_nearest2x


class CSPStage(nn.Layer):
    """conv1 | conv2 -> convs (BasicBlocks without shortcut, SPP after the middle one) -> concat -> conv3."""

    def __init__(self, ch_in: int, ch_out: int, n: int, act: ActLike = "swish", spp: bool = False,
                 use_alpha: bool = False):
        super().__init__()
        ch_mid = int(ch_out // 2)
        self.conv1 = ConvBNLayer(ch_in, ch_mid, 1, act=act)
        self.conv2 = ConvBNLayer(ch_in, ch_mid, 1, act=act)
        self.convs = nn.Sequential()
        for i in range(n):
            self.convs.add_sublayer(
                str(i), BasicBlock(ch_mid, ch_mid, act=act, shortcut=False, use_alpha=use_alpha))
            if spp and i == (n - 1) // 2:
                self.convs.add_sublayer("spp", SPP(ch_mid * 4, ch_mid, 1, (5, 9, 13), act=act))
        self.conv3 = ConvBNLayer(ch_mid * 2, ch_out, 1, act=act)

    def forward(self, x):
        y1 = self.conv1(x)
        y2 = self.convs(self.conv2(x))
        return self.conv3(paddle.concat([y1, y2], axis=1))


class CustomCSPPAN(nn.Layer):
    """Top-down (FPN) then bottom-up (PAN) path over backbone features.

    ``in_channels`` are given from the finest level (stride 8) to the coarsest; ``out_channels``
    from the coarsest to the finest (as in the PaddleDetection configs). ``forward`` takes the
    backbone outputs in stride order 8, 16, 32 and returns features at strides **32, 16, 8**.
    Keys: ``fpn_stages.{i}.{j}``, ``fpn_routes.{i}``, ``pan_stages.{i}.{j}``, ``pan_routes.{i}``.
    """

    def __init__(self, in_channels: Sequence[int] = (256, 512, 1024),
                 out_channels: Sequence[int] = (1024, 512, 256), act: ActLike = "swish",
                 stage_num: int = 1, block_num: int = 3, spp: bool = False,
                 width_mult: float = 1.0, depth_mult: float = 1.0, use_alpha: bool = False,
                 data_format: str = "NCHW"):
        super().__init__()
        if data_format != "NCHW":
            raise NotImplementedError("only NCHW is supported")
        out_channels = [max(round(c * width_mult), 1) for c in out_channels]
        block_num = max(round(block_num * depth_mult), 1)
        act_fn = get_activation(act)
        self.num_blocks = len(in_channels)
        self.data_format = data_format
        self.out_channels = out_channels
        in_rev = list(in_channels)[::-1]

        fpn_stages, fpn_routes = [], []
        ch_pre = 0
        for i, (ch_in, ch_out) in enumerate(zip(in_rev, out_channels)):
            if i > 0:
                ch_in += ch_pre // 2
            stage = nn.Sequential()
            for j in range(stage_num):
                stage.add_sublayer(str(j), CSPStage(ch_in if j == 0 else ch_out, ch_out, block_num,
                                                    act=act_fn, spp=(spp and i == 0),
                                                    use_alpha=use_alpha))
            fpn_stages.append(stage)
            if i < self.num_blocks - 1:
                fpn_routes.append(ConvBNLayer(ch_out, ch_out // 2, 1, stride=1, padding=0, act=act_fn))
            ch_pre = ch_out
        self.fpn_stages = nn.LayerList(fpn_stages)
        self.fpn_routes = nn.LayerList(fpn_routes)

        pan_stages, pan_routes = [], []
        for i in reversed(range(self.num_blocks - 1)):
            pan_routes.append(ConvBNLayer(out_channels[i + 1], out_channels[i + 1], 3, stride=2,
                                          padding=1, act=act_fn))
            ch_in = out_channels[i] + out_channels[i + 1]
            ch_out = out_channels[i]
            stage = nn.Sequential()
            for j in range(stage_num):
                stage.add_sublayer(str(j), CSPStage(ch_in if j == 0 else ch_out, ch_out, block_num,
                                                    act=act_fn, spp=False, use_alpha=use_alpha))
            pan_stages.append(stage)
        self.pan_stages = nn.LayerList(pan_stages[::-1])
        self.pan_routes = nn.LayerList(pan_routes[::-1])

    def forward(self, blocks: Sequence[paddle.Tensor]) -> list[paddle.Tensor]:
        blocks = list(blocks)[::-1]  # coarsest first
        fpn_feats = []
        route = None
        for i, block in enumerate(blocks):
            if i > 0:
                block = paddle.concat([route, block], axis=1)
            route = self.fpn_stages[i](block)
            fpn_feats.append(route)
            if i < self.num_blocks - 1:
                route = self.fpn_routes[i](route)
                # nearest x2 without an interp op (oneDNN-safe graph, same values)
                route = upsample_nearest2x(route)

        pan_feats = [fpn_feats[-1]]
        route = fpn_feats[-1]
        for i in reversed(range(self.num_blocks - 1)):
            route = self.pan_routes[i](route)
            route = self.pan_stages[i](paddle.concat([route, fpn_feats[i]], axis=1))
            pan_feats.append(route)
        return pan_feats[::-1]


def custom_csp_pan_s(**kw) -> CustomCSPPAN:
    """The PP-YOLOE(-seg) "s" neck: inputs 128/256/512, outputs 384/192/96, SPP, swish."""
    cfg = dict(in_channels=(128, 256, 512), out_channels=(768, 384, 192), act="swish",
               stage_num=1, block_num=3, spp=True, width_mult=0.50, depth_mult=0.33)
    cfg.update(kw)
    return CustomCSPPAN(**cfg)
