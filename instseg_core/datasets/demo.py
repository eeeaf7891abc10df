"""The demo images of ``check_dataset``: sample images with their annotations drawn.

PaddleX's dataset checker writes them to ``<output_dir>/check_dataset/demo_img/<file_name>``; the
drawing itself is :func:`instseg_core.visualize.draw_annotations` (PaddleX's checker look). This
module turns COCO annotations into what that function draws, and saves the images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from instseg_core.datasets.coco import is_id, is_number, segmentation_mask
from instseg_core.visualize import Box, draw_annotations

logger = logging.getLogger(__name__)

DEMO_DIR = "check_dataset/demo_img"


def draw_demo(image_path: str | os.PathLike[str], anns: Sequence[dict[str, Any]],
              cat_names: dict[int, str]) -> Image.Image:
    """The image (EXIF-oriented, RGB) with its annotations' masks, boxes and category names; a PIL image.

    Malformed annotations are skipped, never fatal: an unusable segmentation draws no mask, an
    unusable bbox no box; a category id that is not an integer is shown as ``?``.
    """
    with Image.open(image_path) as im:
        image = ImageOps.exif_transpose(im).convert("RGB")
    width, height = image.size
    cids = [a.get("category_id") if is_id(a.get("category_id")) else None for a in anns]
    # a generator: one decoded full-image mask at a time
    masks = (segmentation_mask(a.get("segmentation"), height, width) for a in anns)
    return draw_annotations(np.asarray(image), masks, [_box(a.get("bbox")) for a in anns], cids,
                            ["?" if cid is None else str(cat_names.get(cid, cid)) for cid in cids])


def _box(bbox: Any) -> Box | None:
    """A COCO ``[x, y, w, h]`` as ``(x0, y0, x1, y1)``, or None when it is not a box with a positive size."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)) or bbox[2] <= 0 \
            or bbox[3] <= 0:
        return None
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def demo_relpath(file_name: str, image_id: Any) -> str:
    """Where a demo image goes under ``DEMO_DIR``: ``file_name`` with no way out of that folder."""
    parts = [p for p in PurePosixPath(file_name.replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    return "/".join(parts) if parts else f"image_{image_id}.png"


def write_demo_images(images: Sequence[dict[str, Any]], anns_by_image: dict[Any, list[dict[str, Any]]],
                      cat_names: dict[int, str], image_dir: Path, out: Path) -> list[str]:
    """Draw each image entry's annotations and save it under ``out / DEMO_DIR``.

    Returns the written paths relative to ``out`` (``check_dataset/demo_img/...``), in input order.
    An image Pillow cannot open is logged and left out; the caller has already reported it.
    """
    paths = []
    for img in images:
        rel = f"{DEMO_DIR}/{demo_relpath(img['file_name'], img['id'])}"
        try:
            demo = draw_demo(image_dir / img["file_name"], anns_by_image.get(img["id"], []), cat_names)
        except OSError as e:  # cv2 decoded it but Pillow cannot (rare): no demo, no crash
            logger.warning("cannot draw demo image for %s: %s", img["file_name"], e)
            continue
        _save(demo, out / rel)
        paths.append(rel)
    return paths


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        image.save(path)
    except (ValueError, KeyError):  # extension Pillow cannot write: keep the name, store PNG
        image.save(path, format="PNG")
