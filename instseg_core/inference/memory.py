"""How much memory a predictor needs, estimated before any image is read (to size a job).

The model: a fixed runtime cost (Paddle, the compiled graph, oneDNN caches) plus a few copies of
the weights, plus per image of a batch the decoded photo and its preprocessing, and the graph's
mask canvas: at most ``max_mask_side``^2 * 3/4 pixels (a 4:3 photo) for each of up to
``MASK_CANDIDATES`` detections, at ``BYTES_PER_MASK_PIXEL`` (the float32 product, its uint8 result
and the host's copy). The constants were measured with ``bench/predict_memory.py`` (demo model:
0.65 GB at 640x480, 1.6 GB at 4000x3000 and 8000x6000 with max_mask_side 1333) and are meant to
over- rather than under-estimate; the batch job reserves the estimate from Ray (``memory=``) and
lets its predictor process use that much before an image counts as ``out_of_memory``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
RUNTIME_BYTES = int(0.45 * GIB)  # Paddle Inference + Python + OpenCV, no model
WEIGHT_COPIES = 4  # the params file, the loaded tensors, oneDNN-reordered copies
MASK_CANDIDATES = 100  # detections a graph may draw masks for (official graphs: <= 100 or 300)
BYTES_PER_MASK_PIXEL = 8
PHOTO_PIXELS = 12_000_000  # a 12 MP phone photo, decoded (3 bytes) and preprocessed


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes for one predictor: ``base`` once, ``per_image`` for each image of a batch."""

    base: int
    per_image: int
    batch_size: int

    @property
    def total(self) -> int:
        return self.base + self.per_image * self.batch_size

    def describe(self) -> str:
        return (f"{self.total / GIB:.1f} GiB = model {self.base / GIB:.2f} GiB + {self.batch_size} x "
                f"{self.per_image / GIB:.2f} GiB per image")


def estimate_predictor_memory(model_dir: str | Path | None, batch_size: int, max_mask_side: int | None,
                              params_bytes: int | None = None) -> MemoryEstimate:
    """Estimate for a model dir (its ``inference.pdiparams`` size; ``params_bytes`` when the dir is
    remote) at ``batch_size`` images per call with the predictor's ``max_mask_side``. Without a
    limit the canvas is taken as a 12 MP photo's."""
    if params_bytes is None:
        params = Path(model_dir) / "inference.pdiparams" if model_dir else None
        params_bytes = params.stat().st_size if params is not None and params.is_file() else 300 * 2**20
    canvas = PHOTO_PIXELS if max_mask_side is None else min(PHOTO_PIXELS, max_mask_side * max_mask_side * 3 // 4)
    per_image = PHOTO_PIXELS * 3 * 3 + canvas * MASK_CANDIDATES * BYTES_PER_MASK_PIXEL
    return MemoryEstimate(RUNTIME_BYTES + WEIGHT_COPIES * params_bytes, per_image, max(1, int(batch_size)))
