"""Resizes built from gather / expand / elementwise ops, with no ``*_interp`` op in the graph.

Why: Paddle 3.3's PIR executor cannot build a oneDNN instruction for ``nearest_interp`` /
``bilinear_interp`` (any form: ``scale_factor`` or ``size``, ints or tensors): the op's ``scale``
attribute is an ``ArrayAttribute<DoubleAttribute>``, which ``ConvertPirAttribute2RuntimeAttribute``
does not support, so a graph with such an op fails at its first run with oneDNN on -- PaddleX's
default on CPU for PP-YOLOE_seg-S and Mask-RT-DETR-L/X/H. These helpers compute the values of
Paddle's CPU kernels (``align_corners=False``, ``align_mode=0``, NCHW) in eager mode and in an
exported graph, under oneDNN or not, with the kernel's taps, weights and order of operations:
bit for bit for nearest x2 and for bilinear resizes by a power of two (tested: x2 and x4, every
use in the models); within a few float32 ulps for other ratios (some weights then differ from the
kernel's in the last bit). The bilinear form costs several passes over the output where the fused
kernel makes one (x4 of 72 masks to 640x640: ~1.5 s vs ~0.2 s on 2 cores).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle

__all__ = ["upsample_nearest2x", "resize_bilinear", "bilinear_taps", "bilinear_matrix"]


def upsample_nearest2x(x: paddle.Tensor) -> paddle.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` for NCHW ``x`` (static H, W): each
    pixel repeated 2x2 (``out[i, j] = x[i // 2, j // 2]``)."""
    _, c, h, w = x.shape
    return x.unsqueeze([3, 5]).expand([-1, -1, -1, 2, -1, 2]).reshape([-1, c, 2 * h, 2 * w])


def _taps(in_size: int, out_size: int, scale: float | None):
    """Source indices (lo, hi) and weights (w_lo, w_hi) per output index, float32 arithmetic as
    the CPU kernel's (``ratio * (k + 0.5) - 0.5`` clamped at 0, ``d = src - lo``, ``1 - d``)."""
    ratio = np.float32(1.0 / scale) if scale else np.float32(np.float32(in_size) / np.float32(out_size))
    k = np.arange(out_size, dtype=np.float64)
    src64 = np.float64(ratio) * (k + 0.5) - 0.5  # float * double in the kernel: double
    lo = np.maximum(src64.astype(np.int64), 0)  # static_cast<int> truncates toward 0
    hi = np.minimum(lo + 1, in_size - 1)
    src = np.maximum(src64.astype(np.float32), np.float32(0))
    d = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, d, (np.float32(1) - d).astype(np.float32)


def resize_bilinear(x: paddle.Tensor, size: Sequence[int] | None = None,
                    scale_factor: float | None = None) -> paddle.Tensor:
    """``F.interpolate(x, size | scale_factor, mode="bilinear", align_corners=False)`` for NCHW
    ``x`` with static H, W (the output size must be known when the graph is built).

    ``out = x[n,w]*ds*de + x[s,w]*dn*de + x[n,e]*ds*dw + x[s,e]*dn*dw``, summed left to right as
    the CPU kernel does (bit-identical to ``bilinear_interp`` for power-of-two ratios).
    """
    h, w = int(x.shape[2]), int(x.shape[3])
    if size is not None:
        oh, ow = int(size[0]), int(size[1])
        sh = sw = None
    else:
        oh, ow = int(h * scale_factor), int(w * scale_factor)
        sh = sw = float(scale_factor)
    yn, ys, dn, ds = _taps(h, oh, sh)
    xw, xe, dw, de = _taps(w, ow, sw)

    def idx(a):
        return paddle.to_tensor(a.astype(np.int64))

    def col(a):
        return paddle.to_tensor(a.reshape(-1, 1))

    def row(a):
        return paddle.to_tensor(a.reshape(1, -1))

    # Row taps times their weights at the input width (a quarter of the work for x4), then the
    # column gathers: x[n, w] * ds == (x[n, :] * ds)[w], so the products are the kernel's.
    # Weights are full planes (same values): oneDNN's binary kernels are very slow at
    # broadcasting a [oh, 1] column over a large tensor.
    top = paddle.gather(x, idx(yn), axis=2) * col(ds).expand([oh, w])  # [B, C, oh, w]
    bot = paddle.gather(x, idx(ys), axis=2) * col(dn).expand([oh, w])
    iw, ie = idx(xw), idx(xe)
    de, dw = row(de).expand([oh, ow]), row(dw).expand([oh, ow])
    out = paddle.gather(top, iw, axis=3) * de
    out = out + paddle.gather(bot, iw, axis=3) * de
    out = out + paddle.gather(top, ie, axis=3) * dw
    out = out + paddle.gather(bot, ie, axis=3) * dw
    return out


def bilinear_taps(src: paddle.Tensor, in_size: int, clamp: bool = True):
    """The two taps of 1-D bilinear sampling at continuous source coordinates ``src`` (any shape;
    pixel ``j``'s centre at ``j``): ``(lo, hi, w_lo, w_hi)``, int64 indices and float32 weights,
    with ``value = x[lo] * w_lo + x[hi] * w_hi``. Works in an exported graph with dynamic shapes.

    ``clamp=True`` is ``align_corners=False`` resizing with border padding (``F.interpolate`` and
    ``grid_sample(padding_mode="border")``): ``src`` is clamped into ``[0, in_size - 1]``.
    ``clamp=False`` is ``grid_sample(padding_mode="zeros")``: a tap outside ``[0, in_size - 1]``
    gets weight 0 (its index is clamped only to stay gatherable).
    """
    last = float(in_size - 1)
    if clamp:
        src = paddle.clip(src, 0.0, last)
    base = paddle.floor(src)
    w_hi = src - base
    w_lo = 1.0 - w_hi
    if not clamp:
        w_lo = w_lo * ((base >= 0.0) & (base <= last)).astype(w_lo.dtype)
        w_hi = w_hi * ((base + 1.0 >= 0.0) & (base + 1.0 <= last)).astype(w_hi.dtype)
    lo = paddle.clip(base, 0.0, last).astype("int64")
    hi = paddle.clip(base + 1.0, 0.0, last).astype("int64")
    return lo, hi, w_lo, w_hi


def bilinear_matrix(src: paddle.Tensor, in_size: int, clamp: bool = True) -> paddle.Tensor:
    """Dense 1-D bilinear weights ``[..., K, in_size]`` for source coordinates ``src [..., K]``
    (see :func:`bilinear_taps`): ``matrix @ x`` resamples the rows of ``x`` [in_size, ...]. Two
    nonzeros per row; worth it when ``in_size`` is small (28x28 R-CNN masks, 160x160 prototypes):
    a resize of ``m [h, w]`` to ``[H, W]`` is then ``Ry @ m @ Rx^T``, two matmuls, with no
    ``[H, W, 2]`` sampling grid and no float ``[H, w]`` gathers per output pixel."""
    src = paddle.clip(src, 0.0, float(in_size - 1)) if clamp else src
    cols = paddle.arange(in_size, dtype="float32")
    return paddle.nn.functional.relu(1.0 - paddle.abs(src.unsqueeze(-1) - cols))
