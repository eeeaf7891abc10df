"""``CheckDataset.convert``: turn a LabelMe or standard-COCO dataset into PaddleX's COCO layout.

``src_dataset_type`` is matched without regard to case or surrounding spaces: ``LabelMe``
(:func:`instseg_core.datasets.labelme.convert_labelme_to_coco`, PaddleX's only type) or ``COCO``
(:func:`instseg_core.datasets.coco_convert.convert_standard_coco`, this project's addition).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from instseg_core.datasets.coco_convert import convert_standard_coco
from instseg_core.datasets.labelme import ConvertError, convert_labelme_to_coco

__all__ = ["SOURCE_TYPES", "conversion_log_lines", "convert_dataset", "source_type"]

SOURCE_TYPES: dict[str, str] = {"labelme": "LabelMe", "coco": "COCO"}
LAYOUT_NAMES = {"paddlex": "PaddleX's LabelMe layout with list files", "folder": "LabelMe files found in the folder",
                "coco": "standard COCO layout"}
_MAX_LISTED = 5


def source_type(value: Any) -> str:
    """The canonical spelling (``"LabelMe"`` or ``"COCO"``) of a ``src_dataset_type`` in any case.

    Raises :class:`ConvertError` naming the accepted values for anything else (None included).
    """
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in SOURCE_TYPES:
        accepted = " or ".join(SOURCE_TYPES.values())
        raise ConvertError(f"CheckDataset.convert.src_dataset_type must be {accepted} (any case), got {value!r}")
    return SOURCE_TYPES[key]


def convert_dataset(dataset_dir: str | os.PathLike[str], src_dataset_type: Any, *, seed: int = 0,
                    train_ratio: float = 0.8) -> dict[str, Any]:
    """Convert ``dataset_dir`` in place from ``src_dataset_type`` to PaddleX's COCO layout; returns the
    converter's stats plus ``"src_dataset_type"`` (canonical). Raises :class:`ConvertError`."""
    kind = source_type(src_dataset_type)
    convert = convert_labelme_to_coco if kind == "LabelMe" else convert_standard_coco
    stats = convert(dataset_dir, seed=seed, train_ratio=train_ratio)
    stats["src_dataset_type"] = kind
    return stats


def _error_text(error: Any) -> str:
    return f"{error['json']}: {error['error']}" if isinstance(error, dict) else str(error)


def conversion_log_lines(stats: dict[str, Any]) -> list[tuple[int, str]]:
    """``(logging level, line)`` pairs summarising a conversion: totals, then warnings and skipped files."""
    split = "; ".join(f"{s}: {stats[s]['images']} images, {stats[s]['annotations']} annotations"
                      for s in ("train", "val") if s in stats)
    layout = LAYOUT_NAMES.get(stats.get("layout"), stats.get("layout"))
    head = (f"converted {stats.get('src_dataset_type', '?')} ({layout}) -> "
            f"{', '.join(stats.get('outputs', []))}: {split}; {stats.get('num_classes', '?')} categories")
    if stats.get("labels_file"):
        head += f" from {stats['labels_file']}"
    lines = [(logging.INFO, head)]
    if stats.get("images_linked") or stats.get("images_copied"):
        lines.append((logging.INFO, f"photos placed under images/: {stats.get('images_linked', 0)} hard-linked, "
                                    f"{stats.get('images_copied', 0)} copied"))
    for backup in stats.get("backups", []):
        lines.append((logging.INFO, f"previous file kept as {backup}"))
    for warning in stats.get("warnings", []):
        lines.append((logging.WARNING, warning))
    errors = stats.get("errors", [])
    for error in errors[:_MAX_LISTED]:
        lines.append((logging.WARNING, "skipped: " + _error_text(error)))
    if len(errors) > _MAX_LISTED:
        lines.append((logging.WARNING, f"... and {len(errors) - _MAX_LISTED} more skipped"))
    return lines
