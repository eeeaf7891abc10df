"""PP-HGNetV2 backbone as used by Mask-RT-DETR (sizes S/M/L/X/H).

Layout (names follow the official ``.pdparams``):

* ``stem``: ``stem1`` 3x3/2 -> branch a: ``stem2a`` 2x2/1 "SAME" -> ``stem2b`` 2x2/1 "SAME";
  branch b: 2x2/1 max-pool "SAME" (ceil mode); concat(b, a) -> ``stem3`` 3x3/2 -> ``stem4`` 1x1.
  A 2x2/1 "SAME" window pads one row/column on the right/bottom only.
* ``stages.{i}``: optional depthwise 3x3/2 ``downsample`` (no activation), then ``blocks.{j}``.
* An HG block runs ``layer_num`` conv layers in a chain (``ConvBNAct`` kxk for the first two
  stages, ``LightConvBNAct`` = 1x1 without activation + depthwise kxk with ReLU for the last two),
  concatenates its input with every layer output, and aggregates with a 1x1 squeeze (to out/2)
  and a 1x1 excitation (to out). Every block but the first of a stage adds its input.

BatchNorm is frozen (inference statistics, no gradient) when ``freeze_norm`` is set, as in the
Mask-RT-DETR configs; this changes neither names nor eval results. ``use_lab`` is False there,
so no learnable-affine-block parameters exist.
"""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn as nn

__all__ = ["HGNetV2", "hgnetv2", "HGNETV2_ARCHS", "MASK_RTDETR_SIZE_TO_ARCH"]

# stage rows: (in_ch, mid_ch, out_ch, num_blocks, downsample, light_block, kernel_size, layer_num)
HGNETV2_ARCHS: dict[str, dict] = {
    # PPHGNetV2_B1 (Mask-RT-DETR-S)
    "S": {"stem": (3, 24, 32), "stages": [
        (32, 32, 64, 1, False, False, 3, 3),
        (64, 48, 256, 1, True, False, 3, 3),
        (256, 96, 512, 2, True, True, 5, 3),
        (512, 192, 1024, 1, True, True, 5, 3)]},
    # PPHGNetV2_B2 (Mask-RT-DETR-M)
    "M": {"stem": (3, 24, 32), "stages": [
        (32, 32, 96, 1, False, False, 3, 4),
        (96, 64, 384, 1, True, False, 3, 4),
        (384, 128, 768, 3, True, True, 5, 4),
        (768, 256, 1536, 1, True, True, 5, 4)]},
    # PPHGNetV2_L (Mask-RT-DETR-L)
    "L": {"stem": (3, 32, 48), "stages": [
        (48, 48, 128, 1, False, False, 3, 6),
        (128, 96, 512, 1, True, False, 3, 6),
        (512, 192, 1024, 3, True, True, 5, 6),
        (1024, 384, 2048, 1, True, True, 5, 6)]},
    # PPHGNetV2_B5 / X (Mask-RT-DETR-X)
    "X": {"stem": (3, 32, 64), "stages": [
        (64, 64, 128, 1, False, False, 3, 6),
        (128, 128, 512, 2, True, False, 3, 6),
        (512, 256, 1024, 5, True, True, 5, 6),
        (1024, 512, 2048, 2, True, True, 5, 6)]},
    # PPHGNetV2_H (Mask-RT-DETR-H)
    "H": {"stem": (3, 48, 96), "stages": [
        (96, 96, 192, 2, False, False, 3, 6),
        (192, 192, 512, 3, True, False, 3, 6),
        (512, 384, 1024, 6, True, True, 5, 6),
        (1024, 768, 2048, 3, True, True, 5, 6)]},
}

# Mask-RT-DETR config -> backbone arch (all: return_idx [0,1,2,3], freeze_norm, ReLU, no lab).
MASK_RTDETR_SIZE_TO_ARCH = {"S": "S", "M": "M", "L": "L", "X": "X", "H": "H"}


class _ConvBNAct(nn.Layer):
    """Conv2D (no bias) -> BatchNorm2D -> optional ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, padding="auto", use_act: bool = True, freeze_norm: bool = True):
        super().__init__()
        if padding == "auto":
            padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2D(ch_in, ch_out, kernel_size, stride=stride, padding=padding,
                              groups=groups, bias_attr=False)
        if freeze_norm:
            self.bn = nn.BatchNorm2D(ch_out, use_global_stats=True)
            for p in self.bn.parameters():
                p.stop_gradient = True
        else:
            self.bn = nn.BatchNorm2D(ch_out)
        self.act = nn.ReLU() if use_act else None

    def forward(self, x):
        x = self.bn(self.conv(x))
        if self.act is not None:
            x = self.act(x)
        return x


class _LightConvBNAct(nn.Layer):
    """1x1 ConvBN (no activation) -> depthwise kxk ConvBN + ReLU."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, freeze_norm: bool = True):
        super().__init__()
        self.conv1 = _ConvBNAct(ch_in, ch_out, 1, use_act=False, freeze_norm=freeze_norm)
        self.conv2 = _ConvBNAct(ch_out, ch_out, kernel_size, groups=ch_out, use_act=True,
                                freeze_norm=freeze_norm)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class _StemBlock(nn.Layer):
    def __init__(self, ch_in: int, ch_mid: int, ch_out: int, freeze_norm: bool = True):
        super().__init__()
        fn = freeze_norm
        self.stem1 = _ConvBNAct(ch_in, ch_mid, 3, stride=2, freeze_norm=fn)
        self.stem2a = _ConvBNAct(ch_mid, ch_mid // 2, 2, padding="SAME", freeze_norm=fn)
        self.stem2b = _ConvBNAct(ch_mid // 2, ch_mid, 2, padding="SAME", freeze_norm=fn)
        self.stem3 = _ConvBNAct(ch_mid * 2, ch_mid, 3, stride=2, freeze_norm=fn)
        self.stem4 = _ConvBNAct(ch_mid, ch_out, 1, freeze_norm=fn)
        self.pool = nn.MaxPool2D(kernel_size=2, stride=1, ceil_mode=True, padding="SAME")

    def forward(self, x):
        x = self.stem1(x)
        x2 = self.stem2b(self.stem2a(x))
        x1 = self.pool(x)
        x = paddle.concat([x1, x2], axis=1)
        return self.stem4(self.stem3(x))


class _HGBlock(nn.Layer):
    def __init__(self, ch_in: int, ch_mid: int, ch_out: int, kernel_size: int, layer_num: int,
                 residual: bool, light_block: bool, freeze_norm: bool = True):
        super().__init__()
        self.residual = residual
        layers = []
        for i in range(layer_num):
            cin = ch_in if i == 0 else ch_mid
            if light_block:
                layers.append(_LightConvBNAct(cin, ch_mid, kernel_size, freeze_norm=freeze_norm))
            else:
                layers.append(_ConvBNAct(cin, ch_mid, kernel_size, freeze_norm=freeze_norm))
        self.layers = nn.LayerList(layers)
        total = ch_in + layer_num * ch_mid
        self.aggregation_squeeze_conv = _ConvBNAct(total, ch_out // 2, 1, freeze_norm=freeze_norm)
        self.aggregation_excitation_conv = _ConvBNAct(ch_out // 2, ch_out, 1,
                                                      freeze_norm=freeze_norm)

    def forward(self, x):
        identity = x
        outs = [x]
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        x = paddle.concat(outs, axis=1)
        x = self.aggregation_excitation_conv(self.aggregation_squeeze_conv(x))
        if self.residual:
            x = x + identity
        return x


class _HGStage(nn.Layer):
    def __init__(self, ch_in: int, ch_mid: int, ch_out: int, num_blocks: int, downsample: bool,
                 light_block: bool, kernel_size: int, layer_num: int, freeze_norm: bool = True):
        super().__init__()
        if downsample:
            self.downsample = _ConvBNAct(ch_in, ch_in, 3, stride=2, groups=ch_in, use_act=False,
                                         freeze_norm=freeze_norm)
        else:
            self.downsample = None
        self.blocks = nn.Sequential(*[
            _HGBlock(ch_in if j == 0 else ch_out, ch_mid, ch_out, kernel_size, layer_num,
                     residual=j > 0, light_block=light_block, freeze_norm=freeze_norm)
            for j in range(num_blocks)])

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class HGNetV2(nn.Layer):
    """PP-HGNetV2 feature extractor; ``forward(image)`` returns the maps of ``return_idx``."""

    def __init__(self, arch: str = "L", return_idx: Sequence[int] = (0, 1, 2, 3),
                 freeze_norm: bool = True, freeze_stem_only: bool = True, freeze_at: int = 0):
        super().__init__()
        if arch not in HGNETV2_ARCHS:
            raise ValueError(f"unknown HGNetV2 arch {arch!r}; expected one of {sorted(HGNETV2_ARCHS)}")
        cfg = HGNETV2_ARCHS[arch]
        self.arch = arch
        self.return_idx = list(return_idx)
        self.stem = _StemBlock(*cfg["stem"], freeze_norm=freeze_norm)
        self.stages = nn.LayerList([_HGStage(*row, freeze_norm=freeze_norm)
                                    for row in cfg["stages"]])
        self._out_channels = [row[2] for row in cfg["stages"]]
        self.out_channels = [self._out_channels[i] for i in self.return_idx]
        self.out_strides = [4 * 2 ** i for i in self.return_idx]
        # Frozen parts (training only): the stem, plus stages up to freeze_at when requested.
        if freeze_at >= 0:
            self._freeze(self.stem)
            if not freeze_stem_only:
                for i in range(min(freeze_at + 1, len(self.stages))):
                    self._freeze(self.stages[i])

    @staticmethod
    def _freeze(layer: nn.Layer):
        for p in layer.parameters():
            p.stop_gradient = True

    def forward(self, x) -> list[paddle.Tensor]:
        if isinstance(x, dict):
            x = x["image"]
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
        return outs


def hgnetv2(size: str, **kwargs) -> HGNetV2:
    """Backbone of Mask-RT-DETR-``size`` (S/M/L/X/H); return_idx [0,1,2,3], frozen BN."""
    size = size.upper()
    if size not in MASK_RTDETR_SIZE_TO_ARCH:
        raise ValueError(f"unknown Mask-RT-DETR size {size!r}; expected S, M, L, X or H")
    kwargs.setdefault("return_idx", (0, 1, 2, 3))
    kwargs.setdefault("freeze_norm", True)
    return HGNetV2(MASK_RTDETR_SIZE_TO_ARCH[size], **kwargs)
