"""Point sampling of mask maps (PointRend / Mask2Former style).

Mask costs and losses are evaluated on a few thousand points instead of every pixel: the
prediction (stride 4) and the ground truth (input resolution) are read at the same normalised
locations with bilinear ``grid_sample``, so their resolutions never have to agree.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

__all__ = ["point_sample", "uncertain_points"]


def point_sample(maps: paddle.Tensor, points: paddle.Tensor) -> paddle.Tensor:
    """Bilinear values of ``maps`` [N, h, w] at ``points`` in [0, 1] (x, y) -> [N, P].

    ``points`` is [N, P, 2] (one set per map) or [P, 2] (shared by all maps). Half-pixel
    convention (``align_corners=False``), zeros outside the map.
    """
    n = int(maps.shape[0])
    if points.ndim == 2:
        points = points.unsqueeze(0).expand([n, -1, -1])
    grid = (2.0 * points - 1.0).unsqueeze(1)  # [N, 1, P, 2]
    out = F.grid_sample(maps.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # [N, 1, 1, P]
    return out.reshape([n, -1])


@paddle.no_grad()
def uncertain_points(mask_logits: paddle.Tensor, num_points: int, oversample_ratio: float = 3.0,
                     importance_ratio: float = 0.75) -> paddle.Tensor:
    """Per-mask training points [N, num_points, 2] in [0, 1].

    Draw ``oversample_ratio * num_points`` uniform candidates, keep the
    ``importance_ratio * num_points`` whose logit is closest to 0 (the uncertain boundary region,
    where the loss is informative), and fill the rest with fresh uniform points.
    """
    n = int(mask_logits.shape[0])
    num_candidates = int(num_points * oversample_ratio)
    num_important = int(num_points * importance_ratio)
    num_random = num_points - num_important
    if num_important <= 0:
        return paddle.rand([n, num_random, 2])
    candidates = paddle.rand([n, num_candidates, 2])
    distance = point_sample(mask_logits.detach(), candidates).abs().numpy()  # |logit|: 0 = unsure
    # the set of the most uncertain candidates (their order is irrelevant): argpartition is far
    # cheaper than a sorted top-k on CPU
    idx = np.argpartition(distance, num_important - 1, axis=1)[:, :num_important]
    important = paddle.take_along_axis(candidates, paddle.to_tensor(idx[..., None].repeat(2, -1)), axis=1)
    if num_random <= 0:
        return important
    return paddle.concat([important, paddle.rand([n, num_random, 2])], axis=1)
