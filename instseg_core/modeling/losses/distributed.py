"""Loss normalisers that are global over data-parallel ranks.

A loss normalised by its own batch's positives (or objects) on each rank, then averaged by the
gradient all-reduce, weighs ranks with few positives too much. Dividing every rank's sum by the
mean normaliser over ranks makes N workers with batch b compute the same loss as one process
with batch N*b (as PaddleDetection does for PP-YOLOE and DETR).
"""
from __future__ import annotations

import paddle
import paddle.distributed as dist


def data_parallel_world_size() -> int:
    """Ranks of the initialised process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def mean_over_ranks(value: paddle.Tensor | float) -> paddle.Tensor:
    """The mean of a scalar over all ranks, without gradient; ``value`` itself (as a tensor) when
    training in one process. A collective: every rank must call it the same number of times."""
    t = value.detach().astype("float32") if isinstance(value, paddle.Tensor) else paddle.to_tensor(
        float(value), dtype="float32")
    world = data_parallel_world_size()
    if world < 2:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world
