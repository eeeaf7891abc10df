"""The Ray layer (see README). Importing the package loads nothing heavy: the public names below
are imported on first use, so ``from pipelines import SegmentationPredictor`` costs no Paddle or
Ray import until the class is used."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.segmentation_predictor import SegmentationPredictor

__all__ = ["SegmentationPredictor"]

_LAZY = {"SegmentationPredictor": "pipelines.segmentation_predictor"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(import_module(module), name)
