"""Dataset tools: checking COCO instance-segmentation datasets in PaddleX's layout."""

from instseg_core.datasets.check import check_dataset
from instseg_core.datasets.coco import DatasetError, find_dataset_root, load_coco
from instseg_core.datasets.demo import draw_demo
from instseg_core.datasets.histogram import category_counts, draw_histogram
from instseg_core.datasets.problems import (
    KIND_LEVELS,
    Problem,
    check_annotations,
    check_image,
    summarize_problems,
)

__all__ = [
    "KIND_LEVELS", "DatasetError", "Problem", "category_counts", "check_annotations", "check_dataset",
    "check_image", "draw_demo", "draw_histogram", "find_dataset_root", "load_coco", "summarize_problems",
]
