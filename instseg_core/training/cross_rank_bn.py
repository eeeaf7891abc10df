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


class _SumOverRanks(PyLayer):
    """``all_reduce(sum)`` whose gradient is the all-reduced sum of the ranks' gradients
    (every rank's loss depends on every rank's contribution to the sum)."""

    @staticmethod
    def forward(ctx, t: paddle.Tensor) -> paddle.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> paddle.Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class CrossRankBatchNorm(nn.Layer):
    """Train-mode BatchNorm over the union of all ranks' batches; takes over ``bn``'s parameters
    and running statistics (the same tensors, so optimizers and EMA built on ``bn`` still apply)."""

    def __init__(self, bn: nn.BatchNorm2D):
        super().__init__()
        if getattr(bn, "_data_format", "NCHW") not in ("NCHW", "NCDHW", "NCL", "NC"):
            raise ValueError(f"CrossRankBatchNorm supports channel-first data, not {bn._data_format}")
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
        c = int(x.shape[1])
        axes = [0] + list(range(2, x.ndim))
        view = [1, c] + [1] * (x.ndim - 2)
        # moments about the running mean (a constant shared by all ranks): keeps E[x^2] - E[x]^2
        # from cancelling catastrophically in float32 when |mean| >> std
        shift = self._mean.detach()
        xs = x - shift.reshape(view)
        count = paddle.full([1], float(x.numel()) / c, dtype=x.dtype)
        moments = paddle.concat([xs.sum(axes), (xs * xs).sum(axes), count])
        if dist.is_initialized() and dist.get_world_size() > 1:
            moments = _SumOverRanks.apply(moments)
        n = moments[2 * c]
        mean_s = moments[:c] / n
        var = (moments[c:2 * c] / n - mean_s * mean_s).clip(min=0.0)
        mean = mean_s + shift
        with paddle.no_grad():
            m = self._momentum
            self._mean.set_value(self._mean * m + mean.detach() * (1.0 - m))
            self._variance.set_value(self._variance * m + var.detach() * (1.0 - m))
        scale = paddle.rsqrt(var + self._epsilon)
        if self.weight is not None:
            scale = scale * self.weight
        y = (x - mean.reshape(view)) * scale.reshape(view)
        return y + self.bias.reshape(view) if self.bias is not None else y


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
