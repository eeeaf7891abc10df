"""BatchNorm whose batch statistics span every data-parallel rank (SyncBN that also runs on CPU).

With N workers of batch b, plain BatchNorm normalises each worker's b images by their own mean and
variance, so N workers do not train like one process with batch N*b (and the running statistics
that evaluation uses come from b images). Paddle's ``SyncBatchNorm`` fixes that on GPUs only: its
kernel is not registered for CPU, which is where Ray Train's gloo workers run. This layer sums the
per-channel moments over ranks with one all-reduce per layer in the forward pass, and sums their
gradients in the backward pass, so N ranks compute the statistics, outputs and gradients of the
N*b batch. It keeps BatchNorm's state-dict keys (``weight``, ``bias``, ``_mean``, ``_variance``),
so checkpoints stay interchangeable; in eval mode it is plain inference BatchNorm.
"""
from __future__ import annotations

import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _sum_over_ranks(t: paddle.Tensor) -> paddle.Tensor:
    if _world_size() > 1:
        dist.all_reduce(t)
    return t


class _BatchNormOverRanks(PyLayer):
    """y = BN(x) with the mean and (biased) variance of all ranks' ``x``; a hand-written backward.

    Forward: per-channel sums of ``x - shift`` and its square (``shift``: the running mean, a
    constant shared by all ranks, so E[x^2] - E[x]^2 does not cancel in float32 when |mean| >> std),
    one all-reduce, then Paddle's fused inference BatchNorm with those statistics. Backward: the
    BatchNorm input gradient with the per-channel sums of ``dy`` and ``dy * (x - mean)`` all-reduced
    (every rank's loss depends on every rank's ``x`` through the statistics); the weight and bias
    gradients stay per rank (DataParallel averages them). Autograd through the same arithmetic
    gave the same numbers at about twice the time (benchmark: bench/cross_rank_bn.py).
    """

    @staticmethod
    def forward(ctx, x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor, layer: "CrossRankBatchNorm"):
        c = int(x.shape[1])
        axes = [0] + list(range(2, x.ndim))
        view = [1, c] + [1] * (x.ndim - 2)
        with paddle.no_grad():
            shift = layer._mean.detach()
            xs = x - shift.reshape(view)
            count = paddle.full([1], float(x.numel()) / c, dtype=x.dtype)
            moments = _sum_over_ranks(paddle.concat([xs.sum(axes), paddle.square(xs).sum(axes), count]))
            n = moments[2 * c]
            mean_s = moments[:c] / n
            var = (moments[c:2 * c] / n - mean_s * mean_s).clip(min=0.0)
            mean = mean_s + shift
            m = layer._momentum
            layer._mean.set_value(layer._mean * m + mean * (1.0 - m))
            layer._variance.set_value(layer._variance * m + var * (1.0 - m))
            y = F.batch_norm(x, mean, var, weight, bias, training=False, epsilon=layer._epsilon)
        ctx.save_for_backward(x, weight, mean, paddle.rsqrt(var + layer._epsilon), n)
        ctx.axes, ctx.view = axes, view
        return y

    @staticmethod
    def backward(ctx, dy: paddle.Tensor):
        x, weight, mean, invstd, n = ctx.saved_tensor()
        axes, view, c = ctx.axes, ctx.view, int(mean.shape[0])
        xmu = x - mean.reshape(view)
        sum_dy = dy.sum(axes)
        sum_dy_xmu = (dy * xmu).sum(axes)
        total = _sum_over_ranks(paddle.concat([sum_dy, sum_dy_xmu]))
        mean_dy, mean_dy_xmu = total[:c] / n, total[c:] / n
        k = weight * invstd
        dx = (dy - mean_dy.reshape(view)) * k.reshape(view) - xmu * (k * mean_dy_xmu * invstd * invstd).reshape(view)
        return dx, sum_dy_xmu * invstd, sum_dy


class CrossRankBatchNorm(nn.Layer):
    """Train-mode BatchNorm over the union of all ranks' batches; takes over ``bn``'s parameters
    and running statistics (the same tensors, so optimizers and EMA built on ``bn`` still apply)."""

    def __init__(self, bn: nn.BatchNorm2D):
        super().__init__()
        if getattr(bn, "_data_format", "NCHW") not in ("NCHW", "NCDHW", "NCL", "NC"):
            raise ValueError(f"CrossRankBatchNorm supports channel-first data, not {bn._data_format}")
        if bn.weight is None or bn.bias is None:
            raise ValueError("CrossRankBatchNorm needs an affine BatchNorm (weight and bias)")
        self.weight = bn.weight
        self.bias = bn.bias
        self._mean = bn._mean  # Paddle keeps running statistics as non-trainable parameters
        self._variance = bn._variance
        self._momentum = float(bn._momentum)
        self._epsilon = float(bn._epsilon)
        self._use_global_stats = bool(getattr(bn, "_use_global_stats", False))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not self.training or self._use_global_stats:
            return F.batch_norm(x, self._mean, self._variance, self.weight, self.bias, training=False,
                                momentum=self._momentum, epsilon=self._epsilon)
        return _BatchNormOverRanks.apply(x, self.weight, self.bias, self)


def convert_to_cross_rank_bn(model: nn.Layer) -> int:
    """Replace every trainable ``BatchNorm1D/2D/3D`` sublayer of ``model`` in place; returns how many.

    Frozen ones (``use_global_stats``) are left as they are. Call before ``paddle.DataParallel``.
    """
    converted = 0
    for parent in [model] + [layer for _, layer in model.named_sublayers()]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.layer.norm._BatchNormBase) and not getattr(child, "_use_global_stats", False):
                setattr(parent, name, CrossRankBatchNorm(child))
                converted += 1
    return converted
