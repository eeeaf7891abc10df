"""Instances: the one per-image prediction type every stage reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from instseg_core import masks as M

MaskData = np.ndarray | list  # bool [N, H, W] or a list of COCO RLE dicts


@dataclass
class Instances:
    """Detections of one image, in original-image pixels.

    Attributes:
        boxes: float32 ``[N, 4]`` as ``x1, y1, x2, y2``.
        scores: float32 ``[N]``.
        class_ids: int64 ``[N]``, indices into the model's label list.
        masks: full-image masks, dense bool ``[N, H, W]`` or a list of N COCO RLE dicts.
        image_size: ``(height, width)`` of the original image.
        boxes_from_masks: True when the model gives no boxes (SOLOv2) and ``boxes`` are the
            masks' tight extents; PaddleX-format results then omit ``coordinate``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    masks: MaskData
    image_size: tuple[int, int]
    boxes_from_masks: bool = False
    _dense_cache: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        if not (len(self.scores) == len(self.class_ids) == len(self.masks) == n):
            raise ValueError(
                f"Instances fields disagree in length: boxes {n}, scores {len(self.scores)}, "
                f"class_ids {len(self.class_ids)}, masks {len(self.masks)}"
            )
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def is_rle(self) -> bool:
        return isinstance(self.masks, list)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> "Instances":
        h, w = image_size
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros((0, h, w), dtype=bool), image_size)

    def dense_masks(self) -> np.ndarray:
        """Masks as bool ``[N, H, W]`` (decoded once and cached when stored as RLE)."""
        if not self.is_rle:
            return self.masks
        if self._dense_cache is None:
            h, w = self.image_size
            self._dense_cache = M.decode_rle(self.masks) if self.masks else np.zeros((0, h, w), dtype=bool)
        return self._dense_cache

    def rle_masks(self) -> list:
        """Masks as a list of COCO RLE dicts."""
        return self.masks if self.is_rle else M.encode_rle(self.masks)

    def to_rle(self) -> "Instances":
        """A copy whose masks are RLE (compact: what pipelines store)."""
        return Instances(self.boxes, self.scores, self.class_ids, self.rle_masks(), self.image_size,
                         self.boxes_from_masks)

    def areas(self) -> np.ndarray:
        """Mask areas in pixels, int64 ``[N]``."""
        if self.is_rle:
            return M.rle_area(self.masks)
        return self.masks.reshape(len(self), -1).sum(axis=1).astype(np.int64) if len(self) else np.zeros(0, np.int64)

    def select(self, keep: np.ndarray) -> "Instances":
        """The subset chosen by a bool mask or index array, masks kept aligned with boxes."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=np.int64)
        masks = [self.masks[i] for i in idx] if self.is_rle else self.masks[idx]
        return Instances(self.boxes[idx], self.scores[idx], self.class_ids[idx], masks, self.image_size,
                         self.boxes_from_masks)
