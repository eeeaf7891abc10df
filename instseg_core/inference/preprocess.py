"""Preprocessing from an ``inference.yml`` ``Preprocess`` list.

Ops (PaddleDetection's exported names): ``Resize``, ``NormalizeImage``, ``Permute``, ``PadStride``.
They run in the listed order on one image; ``collate`` then pads a batch to a common size so
keep-ratio models can run several differently-sized images in one call (PaddleX's ``np.stack``
fails there). Arithmetic follows PaddleX 3.x exactly (same cv2 calls, float32 scale/offset) so
that inputs are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import cv2
import numpy as np

# inference.yml integer codes -> cv2 flags (0 NEAREST, 1 LINEAR, 2 CUBIC, 3 AREA, 4 LANCZOS4).
INTERP_CODES = {0: cv2.INTER_NEAREST, 1: cv2.INTER_LINEAR, 2: cv2.INTER_CUBIC, 3: cv2.INTER_AREA, 4: cv2.INTER_LANCZOS4}
INTERP_NAMES = {"NEAREST": 0, "LINEAR": 1, "BILINEAR": 1, "BICUBIC": 2, "CUBIC": 2, "AREA": 3, "LANCZOS4": 4}


class PreprocessConfigError(ValueError):
    """An ``inference.yml`` Preprocess entry this project cannot run."""


@dataclass
class Sample:
    """One image moving through the ops, kept HWC; ``Permute`` and ``PadStride`` are applied once,
    by :func:`collate`, when it copies the image into the batch buffer (fewer full-image copies)."""

    image: np.ndarray
    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    pad_stride: int = 0
    # < 1: the graph is told the original image is this much smaller, so the full-size masks it
    # draws come out bounded (the predictor's ``max_mask_side``); boxes and masks are scaled back
    mask_scale: float = 1.0

    @property
    def scale_factor(self) -> tuple[float, float]:
        return (self.resized_hw[0] / self.orig_hw[0], self.resized_hw[1] / self.orig_hw[1])

    @property
    def graph_scale_factor(self) -> tuple[float, float]:
        """What the graph is fed as ``scale_factor``: input size over the (reduced) original size."""
        sy, sx = self.scale_factor
        return (sy / self.mask_scale, sx / self.mask_scale)

    @property
    def padded_hw(self) -> tuple[int, int]:
        h, w = self.image.shape[:2]
        if self.pad_stride > 0:
            h, w = -(-h // self.pad_stride) * self.pad_stride, -(-w // self.pad_stride) * self.pad_stride
        return h, w


Op = Callable[[Sample], Sample]


def _resize(target_size: Sequence[int], keep_ratio: bool = False, interp: int | str = 2) -> Op:
    if isinstance(interp, str):
        if interp.upper() not in INTERP_NAMES:
            raise PreprocessConfigError(f"Resize: unknown interp {interp!r}")
        interp = INTERP_NAMES[interp.upper()]
    if interp not in INTERP_CODES:
        raise PreprocessConfigError(f"Resize: unknown interp code {interp!r} (expected 0-4)")
    if isinstance(target_size, int):
        target_size = [target_size, target_size]
    th, tw = (int(v) for v in target_size)  # inference.yml gives [h, w]
    flag = INTERP_CODES[interp]

    def resize(s: Sample) -> Sample:
        h, w = s.image.shape[:2]
        if keep_ratio:
            scale = min(max(th, tw) / max(h, w), min(th, tw) / min(h, w))
            new_w, new_h = round(w * scale), round(h * scale)  # Python round, as PaddleX
        else:
            new_w, new_h = tw, th
        s.image = cv2.resize(s.image, (new_w, new_h), interpolation=flag)
        s.resized_hw = (new_h, new_w)
        return s

    return resize


def _normalize(mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
               is_scale: bool = True, norm_type: str | None = "mean_std") -> Op:
    # PaddleX treats a missing/"none" norm_type as mean_std; any other value means mean 0, std 1.
    if norm_type not in (None, "none", "mean_std"):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    scale = 1.0 / 255.0 if is_scale else 1.0
    alpha = np.array([scale / s for s in std], dtype=np.float32)
    beta = np.array([-mean[i] / std[i] for i in range(3)], dtype=np.float32)

    def normalize(s: Sample) -> Sample:
        # Per channel plane (contiguous, ~8x faster than broadcasting over HWC): float32 multiply,
        # then float32 add, which is PaddleX's exact arithmetic (bit-identical results).
        planes = []
        for c, plane in enumerate(cv2.split(s.image)):
            f = plane.astype(np.float32)
            f *= alpha[c]
            f += beta[c]
            planes.append(f)
        s.image = cv2.merge(planes)
        return s

    return normalize


def _permute() -> Op:
    # The batch is always CHW: collate transposes while copying into the batch buffer.
    return lambda s: s


def _pad_stride(stride: int = 0) -> Op:
    def pad(s: Sample) -> Sample:
        s.pad_stride = max(s.pad_stride, int(stride))  # zero padding bottom/right, done by collate
        return s

    return pad


OP_BUILDERS: dict[str, Callable[..., Op]] = {
    "Resize": _resize,
    "NormalizeImage": _normalize,
    "Permute": _permute,
    "PadStride": _pad_stride,
}


def build_preprocess(ops_config: Sequence[dict[str, Any]], source: str = "inference.yml") -> list[Op]:
    """Turn a ``Preprocess`` list into callables; unknown ops or arguments are clear errors."""
    ops = []
    for entry in ops_config:
        if not isinstance(entry, dict) or "type" not in entry:
            raise PreprocessConfigError(f"{source}: Preprocess entry {entry!r} has no 'type'")
        kind = entry["type"]
        if kind not in OP_BUILDERS:
            raise PreprocessConfigError(
                f"{source}: unknown preprocess op {kind!r}; supported: {', '.join(OP_BUILDERS)}")
        args = {k: v for k, v in entry.items() if k != "type"}
        try:
            ops.append(OP_BUILDERS[kind](**args))
        except TypeError as e:
            raise PreprocessConfigError(f"{source}: bad arguments for {kind}: {e}") from None
    return ops


class Preprocessor:
    """Runs the ops on BGR images and collates batches into the model's three named inputs."""

    def __init__(self, ops_config: Sequence[dict[str, Any]], source: str = "inference.yml"):
        self.ops = build_preprocess(ops_config, source)

    def __call__(self, image_bgr: np.ndarray) -> Sample:
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        s = Sample(rgb, (h, w), (h, w))
        for op in self.ops:
            s = op(s)
        return s


def collate(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Stack samples into ``im_shape``, ``image`` (NCHW float32), ``scale_factor``.

    Each image is zero-padded bottom/right to its stride, then to the largest size in the batch
    (``im_shape`` keeps each image's unpadded size), so keep-ratio models run mixed sizes together.
    """
    sizes = [s.padded_hw for s in samples]
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    c = samples[0].image.shape[2] if samples[0].image.ndim == 3 else 1
    batch = np.zeros((len(samples), c, hmax, wmax), dtype=np.float32)
    for i, s in enumerate(samples):
        h, w = s.image.shape[:2]
        batch[i, :, :h, :w] = s.image.reshape(h, w, c).transpose(2, 0, 1)
    return {
        "im_shape": np.array([s.resized_hw for s in samples], dtype=np.float32),
        "image": batch,
        "scale_factor": np.array([s.graph_scale_factor for s in samples], dtype=np.float32),
    }
