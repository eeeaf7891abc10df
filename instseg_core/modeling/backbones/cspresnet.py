"""CSPResNet backbone of PP-YOLOE (training form, with RepVGG ``alpha`` and effective SE)."""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn as nn

from instseg_core.modeling.layers import ActLike, BasicBlock, ConvBNLayer, EffectiveSELayer, get_activation


class CSPResStage(nn.Layer):
    """conv_down (stride 2) -> split into conv1 / conv2+blocks -> concat -> ESE -> conv3."""

    def __init__(self, ch_in: int, ch_out: int, n: int, stride: int, act: ActLike = "relu",
                 attn: bool = True, use_alpha: bool = False):
        super().__init__()
        ch_mid = (ch_in + ch_out) // 2
        if stride == 2:
            self.conv_down = ConvBNLayer(ch_in, ch_mid, 3, stride=2, padding=1, act=act)
        else:
            self.conv_down = None
        self.conv1 = ConvBNLayer(ch_mid, ch_mid // 2, 1, act=act)
        self.conv2 = ConvBNLayer(ch_mid, ch_mid // 2, 1, act=act)
        self.blocks = nn.Sequential(*[
            BasicBlock(ch_mid // 2, ch_mid // 2, act=act, shortcut=True, use_alpha=use_alpha)
            for _ in range(n)])
        self.attn = EffectiveSELayer(ch_mid, act="hardsigmoid") if attn else None
        self.conv3 = ConvBNLayer(ch_mid, ch_out, 1, act=act)

    def forward(self, x):
        if self.conv_down is not None:
            x = self.conv_down(x)
        y1 = self.conv1(x)
        y2 = self.blocks(self.conv2(x))
        y = paddle.concat([y1, y2], axis=1)
        if self.attn is not None:
            y = self.attn(y)
        return self.conv3(y)


class CSPResNet(nn.Layer):
    """CSPResNet. Keys: ``stem.conv{1,2,3}.*`` (large stem) and ``stages.{i}.*``.

    ``forward`` takes an image tensor ``[N, 3, H, W]`` (or a dict with ``"image"``) and returns the
    outputs of the stages in ``return_idx`` (default 1, 2, 3: strides 8, 16, 32).
    """

    def __init__(self, layers: Sequence[int] = (3, 6, 6, 3),
                 channels: Sequence[int] = (64, 128, 256, 512, 1024), act: ActLike = "swish",
                 return_idx: Sequence[int] = (1, 2, 3), use_large_stem: bool = False,
                 width_mult: float = 1.0, depth_mult: float = 1.0, use_alpha: bool = False):
        super().__init__()
        channels = [max(round(c * width_mult), 1) for c in channels]
        layers = [max(round(n * depth_mult), 1) for n in layers]
        act_fn = get_activation(act)
        if use_large_stem:
            self.stem = nn.Sequential(
                ("conv1", ConvBNLayer(3, channels[0] // 2, 3, stride=2, padding=1, act=act_fn)),
                ("conv2", ConvBNLayer(channels[0] // 2, channels[0] // 2, 3, stride=1, padding=1,
                                      act=act_fn)),
                ("conv3", ConvBNLayer(channels[0] // 2, channels[0], 3, stride=1, padding=1,
                                      act=act_fn)))
        else:
            self.stem = nn.Sequential(
                ("conv1", ConvBNLayer(3, channels[0] // 2, 3, stride=2, padding=1, act=act_fn)),
                ("conv2", ConvBNLayer(channels[0] // 2, channels[0], 3, stride=1, padding=1,
                                      act=act_fn)))
        n = len(channels) - 1
        self.stages = nn.Sequential(*[
            (str(i), CSPResStage(channels[i], channels[i + 1], layers[i], 2, act=act_fn,
                                 use_alpha=use_alpha))
            for i in range(n)])
        self.return_idx = list(return_idx)
        self.out_channels = [channels[i + 1] for i in self.return_idx]
        self.out_strides = [4 * 2 ** i for i in self.return_idx]

    def forward(self, inputs: paddle.Tensor | dict[str, paddle.Tensor]) -> list[paddle.Tensor]:
        x = inputs["image"] if isinstance(inputs, dict) else inputs
        x = self.stem(x)
        outs = []
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs


def cspresnet_s(**kw) -> CSPResNet:
    """The PP-YOLOE(-seg) "s" backbone: width 0.50, depth 0.33, large stem, alpha, swish."""
    cfg = dict(layers=(3, 6, 6, 3), channels=(64, 128, 256, 512, 1024), act="swish",
               return_idx=(1, 2, 3), use_large_stem=True, use_alpha=True,
               width_mult=0.50, depth_mult=0.33)
    cfg.update(kw)
    return CSPResNet(**cfg)
