"""ResNet / ResNeXt backbones of the R-CNN family and SOLOv2 (eval-mode, frozen BatchNorm).

Usage::

    from instseg_core.modeling.backbones.resnet import ResNet, resnet50

    backbone = resnet50()                    # ResNet50-b, returns [res2, res3, res4, res5]
    backbone = ResNet(depth=50, variant="b", return_idx=(0, 1, 2, 3))   # the same
    feats = backbone(image)                  # list of NCHW tensors, strides 4/8/16/32
    backbone.out_channels                    # [256, 512, 1024, 2048]

Variants: ``"b"`` (7x7 stem; stride on the 3x3 conv of each bottleneck) and ``"d"`` (three 3x3
stem convs, and an avg-pool before the 1x1 projection shortcut of strided blocks). ResNeXt is
``groups=64, base_width=4``. Only the stages up to ``num_stages`` are built (the C4 Mask R-CNN
uses ``num_stages=3`` and puts res5 into its RoI head, :class:`Res5Head`).

State-dict keys follow PaddleDetection's (``conv1.conv1.conv.weight``,
``res2.res2a.branch2a.norm._mean``, ``res3.res3a.short.conv.conv.weight`` for a vd pooled
shortcut, ``res4.res4b22`` for depth 101), so official ``.pdparams`` load as they are.
"""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

__all__ = ["ConvNormLayer", "BottleNeck", "Blocks", "ResNet", "Res5Head", "resnet50"]

# bottleneck counts of res2..res5
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ConvNormLayer(nn.Layer):
    """Conv2D (no bias, 'same' padding for odd kernels) -> BatchNorm2D -> optional ReLU.

    The BN statistics are frozen (``use_global_stats``): the pretrained backbones are fine-tuned
    with fixed normalisation, and eval mode uses the running statistics anyway.
    Keys: ``conv.weight``, ``norm.{weight,bias,_mean,_variance}``.
    """

    def __init__(self, ch_in: int, ch_out: int, filter_size: int, stride: int = 1, groups: int = 1,
                 act: bool = False):
        super().__init__()
        self.conv = nn.Conv2D(ch_in, ch_out, kernel_size=filter_size, stride=stride,
                              padding=(filter_size - 1) // 2, groups=groups, bias_attr=False)
        self.norm = nn.BatchNorm2D(ch_out, use_global_stats=True)
        for p in self.norm.parameters():
            p.stop_gradient = True
        self.act = act

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.norm(self.conv(x))
        return F.relu(x) if self.act else x


class BottleNeck(nn.Layer):
    """1x1 reduce -> 3x3 (carries the stride; grouped for ResNeXt) -> 1x1 expand, plus shortcut.

    The shortcut is the identity except in the first block of a stage, where a 1x1 conv+BN
    projects the input; in variant ``d`` a strided projection is replaced by
    AvgPool(2, 2, ceil) + stride-1 conv, so no input pixel is skipped.
    """

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, variant: str = "b",
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        # variant "a" puts the stride on the first 1x1 conv; all others on the 3x3 conv
        stride1, stride2 = (stride, 1) if variant == "a" else (1, stride)
        width = int(ch_out * (base_width / 64.0)) * groups
        self.branch2a = ConvNormLayer(ch_in, width, 1, stride=stride1, act=True)
        self.branch2b = ConvNormLayer(width, width, 3, stride=stride2, groups=groups, act=True)
        self.branch2c = ConvNormLayer(width, ch_out * self.expansion, 1)
        self.shortcut = shortcut
        if not shortcut:
            if variant == "d" and stride == 2:
                self.short = nn.Sequential()
                self.short.add_sublayer("pool", nn.AvgPool2D(kernel_size=2, stride=2, padding=0, ceil_mode=True))
                self.short.add_sublayer("conv", ConvNormLayer(ch_in, ch_out * self.expansion, 1))
            else:
                self.short = ConvNormLayer(ch_in, ch_out * self.expansion, 1, stride=stride)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        short = x if self.shortcut else self.short(x)
        return F.relu(out + short)


def _block_name(stage_num: int, count: int, i: int) -> str:
    """PaddleDetection's block names: res4a, res4b1..res4b22 for deep res4 stages, else res{S}a, b, c..."""
    if count > 10 and stage_num == 4:
        return "res4a" if i == 0 else f"res4b{i}"
    return f"res{stage_num}{chr(ord('a') + i)}"


class Blocks(nn.Layer):
    """One stage ``res{stage_num}``: ``count`` bottlenecks, the first one strided (except res2)
    and with a projection shortcut."""

    def __init__(self, ch_in: int, ch_out: int, count: int, stage_num: int, variant: str = "b",
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        self.blocks: list[BottleNeck] = []
        for i in range(count):
            block = self.add_sublayer(
                _block_name(stage_num, count, i),
                BottleNeck(ch_in, ch_out, stride=2 if i == 0 and stage_num != 2 else 1, shortcut=i != 0,
                           variant=variant, groups=groups, base_width=base_width))
            self.blocks.append(block)
            ch_in = ch_out * BottleNeck.expansion

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResNet(nn.Layer):
    """ResNet-``depth`` (50/101/152), variant ``b`` or ``d``; ResNeXt with ``groups``/``base_width``.

    ``forward(image)`` returns the outputs of the stages in ``return_idx`` (0 = res2, stride 4,
    ... 3 = res5, stride 32), a list of NCHW tensors; ``out_channels`` / ``out_strides`` describe them.
    """

    def __init__(self, depth: int = 50, variant: str = "b", groups: int = 1, base_width: int = 64,
                 return_idx: Sequence[int] = (0, 1, 2, 3), num_stages: int = 4):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of {sorted(RESNET_DEPTHS)}")
        if not 1 <= num_stages <= 4 or max(return_idx) >= num_stages:
            raise ValueError(f"return_idx {list(return_idx)} must index the {num_stages} built stages")
        self.depth, self.variant = depth, variant
        self.return_idx = [int(i) for i in return_idx]
        # stem: one 7x7/2 conv, or (vd) three 3x3 convs that cost about the same but see finer detail
        self.conv1 = nn.Sequential()
        if variant in ("c", "d"):
            stem = [(3, 32, 3, 2, "conv1_1"), (32, 32, 3, 1, "conv1_2"), (32, 64, 3, 1, "conv1_3")]
        else:
            stem = [(3, 64, 7, 2, "res_conv1" if groups > 1 else "conv1")]
        for c_in, c_out, k, s, name in stem:
            self.conv1.add_sublayer(name, ConvNormLayer(c_in, c_out, k, stride=s, act=True))

        ch_out_list = (64, 128, 256, 512)
        self._all_channels = [BottleNeck.expansion * c for c in ch_out_list]
        self.stages: list[Blocks] = []
        ch_in = 64
        for i in range(num_stages):
            stage = self.add_sublayer(
                f"res{i + 2}", Blocks(ch_in, ch_out_list[i], RESNET_DEPTHS[depth][i], stage_num=i + 2,
                                      variant=variant, groups=groups, base_width=base_width))
            self.stages.append(stage)
            ch_in = self._all_channels[i]

    def freeze_stages(self, freeze_at: int = 0) -> None:
        """Training only: stop gradients into the stem and the stages up to index ``freeze_at``
        (PaddleDetection's ``freeze_at``: 0 = stem + res2, -1 = nothing). The BatchNorm
        parameters are frozen in every stage already."""
        if freeze_at < 0:
            return
        for layer in [self.conv1] + self.stages[:freeze_at + 1]:
            for p in layer.parameters():
                p.stop_gradient = True

    def set_stage_lr_mult(self, lr_mult: Sequence[float]) -> None:
        """Training only: per-stage learning-rate multipliers for res2..res5 (PaddleDetection's
        ``lr_mult_list``), kept on each parameter where Paddle's optimizers read it."""
        for stage, mult in zip(self.stages, lr_mult):
            for p in stage.parameters():
                p.optimize_attr["learning_rate"] = float(mult)

    @property
    def out_channels(self) -> list[int]:
        return [self._all_channels[i] for i in self.return_idx]

    @property
    def out_strides(self) -> list[int]:
        return [4 * 2 ** i for i in self.return_idx]

    def forward(self, image: paddle.Tensor) -> list[paddle.Tensor]:
        x = F.max_pool2d(self.conv1(image), kernel_size=3, stride=2, padding=1)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
        return outs


class Res5Head(nn.Layer):
    """The res5 stage (ResNet50-b, 3 bottlenecks, stride 2) applied to RoI features: the C4 Mask
    R-CNN's box/mask feature extractor. 14x14x1024 RoI features -> 7x7x2048. Keys ``res5.res5{a,b,c}``."""

    def __init__(self, ch_in: int = 1024, ch_out: int = 512):
        super().__init__()
        self.res5 = Blocks(ch_in, ch_out, count=3, stage_num=5)
        self.out_channels = ch_out * BottleNeck.expansion

    def forward(self, roi_feat: paddle.Tensor) -> paddle.Tensor:
        return self.res5(roi_feat)


def resnet50(variant: str = "b", return_idx: Sequence[int] = (0, 1, 2, 3)) -> ResNet:
    """ResNet50 (variant ``b`` by default) returning res2..res5."""
    return ResNet(depth=50, variant=variant, return_idx=return_idx)
