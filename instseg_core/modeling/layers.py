"""Building blocks shared by the PP-YOLOE family (CSPResNet backbone, CustomCSPPAN neck).

Sub-layer attribute names are part of the state-dict contract (``conv``, ``bn``,
``conv1``, ``conv2``, ``alpha``, ``fc``); do not rename them.
"""
from __future__ import annotations

from typing import Callable

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

ActLike = None | str | Callable[[paddle.Tensor], paddle.Tensor]


def _identity(x):
    return x


def get_activation(act: ActLike) -> Callable[[paddle.Tensor], paddle.Tensor]:
    """Map an activation name (a ``paddle.nn.functional`` function name) or callable to a callable."""
    if act is None:
        return _identity
    if callable(act):
        return act
    name = str(act).lower()
    if name in ("identity", "linear", "none"):
        return _identity
    if name == "silu":  # same function as swish: x * sigmoid(x)
        name = "swish"
    fn = getattr(F, name, None)
    if fn is None:
        raise ValueError(f"unknown activation {act!r}")
    return fn


class ConvBNLayer(nn.Layer):
    """Conv2D (no bias) -> BatchNorm2D (default eps/momentum) -> activation.

    Keys: ``conv.weight``, ``bn.{weight,bias,_mean,_variance}``.
    """

    def __init__(self, ch_in: int, ch_out: int, filter_size: int = 3, stride: int = 1,
                 groups: int = 1, padding: int = 0, act: ActLike = None,
                 data_format: str = "NCHW"):
        super().__init__()
        self.conv = nn.Conv2D(ch_in, ch_out, kernel_size=filter_size, stride=stride,
                              padding=padding, groups=groups, bias_attr=False,
                              data_format=data_format)
        self.bn = nn.BatchNorm2D(ch_out, data_format=data_format)
        self.act = get_activation(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RepVggBlock(nn.Layer):
    """Training-form RepVGG block: act(bn(conv3x3(x)) + alpha * bn(conv1x1(x))).

    ``alpha`` is a learnable scalar ``[1]`` when ``alpha=True`` (key ``alpha``), else absent.
    """

    def __init__(self, ch_in: int, ch_out: int, act: ActLike = "relu", alpha: bool = False):
        super().__init__()
        self.ch_in = ch_in
        self.ch_out = ch_out
        self.conv1 = ConvBNLayer(ch_in, ch_out, 3, stride=1, padding=1, act=None)
        self.conv2 = ConvBNLayer(ch_in, ch_out, 1, stride=1, padding=0, act=None)
        self.act = get_activation(act)
        if alpha:
            self.alpha = self.create_parameter(
                shape=[1], default_initializer=nn.initializer.Constant(1.0))
        else:
            self.alpha = None

    def forward(self, x):
        if hasattr(self, "conv"):  # deploy form (after convert_to_deploy)
            return self.act(self.conv(x))
        if self.alpha is not None:
            y = self.conv1(x) + self.alpha * self.conv2(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)

    @staticmethod
    def _fuse_conv_bn(branch: "ConvBNLayer"):
        """(kernel, bias) of conv followed by eval-mode BN, as float64 numpy arrays."""
        import numpy as np

        w = branch.conv.weight.numpy().astype(np.float64)
        bn = branch.bn
        gamma = bn.weight.numpy().astype(np.float64)
        beta = bn.bias.numpy().astype(np.float64)
        mean = bn._mean.numpy().astype(np.float64)
        var = bn._variance.numpy().astype(np.float64)
        std = np.sqrt(var + float(bn._epsilon))
        t = gamma / std
        return w * t.reshape([-1, 1, 1, 1]), beta - mean * t

    def convert_to_deploy(self) -> None:
        """Fold both branches' BN (and ``alpha``) into one 3x3 conv with bias, named ``conv``.

        Drops ``conv1``/``conv2``/``alpha``; the block then computes ``act(conv(x))``. Idempotent.
        """
        import numpy as np

        if hasattr(self, "conv"):
            return
        k3, b3 = self._fuse_conv_bn(self.conv1)
        k1, b1 = self._fuse_conv_bn(self.conv2)
        a = float(self.alpha.numpy().reshape(-1)[0]) if self.alpha is not None else 1.0
        kernel = k3 + a * np.pad(k1, [[0, 0], [0, 0], [1, 1], [1, 1]])
        bias = b3 + a * b1
        conv = nn.Conv2D(self.ch_in, self.ch_out, kernel_size=3, stride=1, padding=1,
                         data_format=self.conv1.conv._data_format)
        conv.weight.set_value(kernel.astype("float32"))
        conv.bias.set_value(bias.astype("float32"))
        self.conv = conv
        del self.conv1
        del self.conv2
        if self.alpha is not None:
            del self.alpha
        self.alpha = None


class BasicBlock(nn.Layer):
    """conv1 (3x3 ConvBN + act) -> conv2 (RepVggBlock), optional identity shortcut."""

    def __init__(self, ch_in: int, ch_out: int, act: ActLike = "relu", shortcut: bool = True,
                 use_alpha: bool = False):
        super().__init__()
        if shortcut and ch_in != ch_out:
            raise ValueError("BasicBlock shortcut needs ch_in == ch_out")
        self.conv1 = ConvBNLayer(ch_in, ch_out, 3, stride=1, padding=1, act=act)
        self.conv2 = RepVggBlock(ch_out, ch_out, act=act, alpha=use_alpha)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class EffectiveSELayer(nn.Layer):
    """Effective squeeze-excitation: x * hardsigmoid(fc(mean_hw(x))), ``fc`` a 1x1 conv with bias."""

    def __init__(self, channels: int, act: ActLike = "hardsigmoid"):
        super().__init__()
        self.fc = nn.Conv2D(channels, channels, kernel_size=1, padding=0)
        self.act = get_activation(act)

    def forward(self, x):
        x_se = x.mean(axis=[2, 3], keepdim=True)
        return x * self.act(self.fc(x_se))


class SPP(nn.Layer):
    """Spatial pyramid pooling: concat([x, maxpool_k(x) for k]) -> ConvBN (key ``conv``)."""

    def __init__(self, ch_in: int, ch_out: int, k: int, pool_size=(5, 9, 13), act: ActLike = "swish",
                 data_format: str = "NCHW"):
        super().__init__()
        self.data_format = data_format
        self.pool_sizes = tuple(int(s) for s in pool_size)
        self.conv = ConvBNLayer(ch_in, ch_out, k, padding=k // 2, act=act, data_format=data_format)

    def forward(self, x):
        outs = [x]
        for s in self.pool_sizes:
            outs.append(F.max_pool2d(x, kernel_size=s, stride=1, padding=s // 2,
                                     ceil_mode=False, data_format=self.data_format))
        axis = 1 if self.data_format == "NCHW" else -1
        return self.conv(paddle.concat(outs, axis=axis))
