"""Overlay drawing for instance-segmentation results (PaddleX 3.x look, without its colour bug).

Two styles, chosen by ``Instances.boxes_from_masks``:

* **box models** (Mask-RT-DETR, MaskRCNN, Cascade, PP-YOLOE_seg): masks blended inside their
  (rounded) boxes, then a box and a ``"{label} {score:.2f}"`` tag per instance, drawn with PIL.
* **SOLOv2**: masks blended over their extents, a 1-px rectangle around each mask and a small
  ``"%s %.2f"`` tag drawn with cv2.

Deliberate differences from PaddleX:

* PaddleX draws the BGR ``input_img`` as if it were RGB, so red and blue come out swapped; here
  the image is converted to RGB first.
* The font is Pillow's bundled default (scalable since Pillow 10.1) instead of PingFang, so
  nothing is downloaded.
* An all-zero mask is skipped instead of raising (PaddleX's SOLOv2 path fails on one).
* Box line width is at least 1 px (PaddleX's ``int(max(W, H) * 0.002)`` is 0 below 500 px).
* Label text is at least ``MIN_TEXT_PX`` high (PaddleX's ``0.018 * W + 2`` is 4 px on a 160 px
  image), and SOLOv2 tags scale with the image like the others (PaddleX's fixed cv2 scale 0.3 is
  unreadable on a 12 MP photo).
* Same-class masks cycle through three shades of their colour (PaddleX lightens the colour again
  for every instance, so the 17th star of an image is drawn almost white and vanishes). The first
  two instances of a class keep PaddleX's values.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from instseg_core import masks as M
from instseg_core.structures import Instances

Color = tuple[int, int, int]

# PaddleX's 20-colour RGB palette; index i is picked by instance order (see `_first_seen_colors`).
PALETTE: tuple[Color, ...] = (
    (255, 0, 0), (204, 255, 0), (0, 255, 102), (0, 102, 255), (204, 0, 255),
    (255, 77, 0), (128, 255, 0), (0, 255, 178), (0, 26, 255), (255, 0, 229),
    (255, 153, 0), (51, 255, 0), (0, 255, 255), (51, 0, 255), (255, 0, 153),
    (255, 229, 0), (0, 255, 26), (0, 178, 255), (128, 0, 255), (255, 0, 77),
)
# Palette entries dark enough to need white text; the rest get a dark navy.
_WHITE_TEXT_INDICES = frozenset({0, 3, 4, 8, 9, 13, 14, 18, 19})
_WHITE: Color = (255, 255, 255)
_DARK_TEXT: Color = (20, 14, 53)

MASK_ALPHA = 0.7  # weight of the colour on masked pixels (0.3 * pixel + 0.7 * colour)
MIN_TEXT_PX = 10  # smallest label font size that stays legible
# lightening steps of a class colour for its 1st, 2nd, 3rd, 4th... instance (PaddleX: 1, 2, 3, 4...)
_SHADE_STEPS = (1, 2, 0)


def label_for(labels: Sequence[str], class_id: int) -> str:
    """The label of ``class_id``, or its decimal string when the label list is too short."""
    return str(labels[class_id]) if 0 <= class_id < len(labels) else str(class_id)


def draw_instances(image_bgr: np.ndarray, instances: Instances, labels: Sequence[str]) -> Image.Image:
    """Draw masks, boxes and labels of ``instances`` over a BGR image; returns an RGB PIL image."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.shape[:2] != instances.image_size:
        raise ValueError(f"image of shape {image_bgr.shape} does not match instances of size {instances.image_size}")
    rgb = cv2.cvtColor(np.ascontiguousarray(image_bgr), cv2.COLOR_BGR2RGB)  # a new array, drawn on
    if instances.boxes_from_masks:
        return _draw_solov2(rgb, instances, labels)
    return _draw_box_model(rgb, instances, labels)


# ---------------------------------------------------------------------------------------------
# masks


def _shade(base: Color, steps: int) -> list[int]:
    """``base`` lightened ``steps`` times as PaddleX lightens (``int(c * 0.6 + 102)`` per step)."""
    color = list(base)
    for _ in range(steps):
        color = [int(c * 0.6 + 102) for c in color]
    return color


def _text_px(width: int) -> int:
    """Label font size for an image ``width`` px wide: PaddleX's ``0.018 * W + 2``, at least legible."""
    return max(MIN_TEXT_PX, int(0.018 * width) + 2)


def _mask_regions(instances: Instances) -> list[tuple[int, int, int, int] | None]:
    """Per instance, the pixel region ``(x0, y0, x1, y1)`` its mask is blended in, or None if empty.

    That is the box rounded like PaddleX's mask crop (``round``, half-to-even) and clipped to the
    image. Blending only there keeps 4k images with many masks cheap.
    """
    h, w = instances.image_size
    regions: list[tuple[int, int, int, int] | None] = []
    for box in instances.boxes:
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        regions.append((x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None)
    return regions


def _mask_crop(instances: Instances, i: int, region: tuple[int, int, int, int]) -> np.ndarray:
    """Mask ``i`` inside ``region`` as bool; RLE masks are decoded one at a time to bound memory."""
    x0, y0, x1, y1 = region
    full = M.decode_rle([instances.masks[i]])[0] if instances.is_rle else instances.masks[i]
    crop = full[y0:y1, x0:x1]
    return crop if crop.dtype == bool else crop > 0


def _union(regions: list[tuple[int, int, int, int] | None]) -> tuple[int, int, int, int] | None:
    boxes = [r for r in regions if r is not None]
    if not boxes:
        return None
    x0s, y0s, x1s, y1s = zip(*boxes)
    return min(x0s), min(y0s), max(x1s), max(y1s)


def _blend_masks(rgb: np.ndarray, instances: Instances) -> list[list[int]]:
    """Blend each mask into ``rgb`` (in place) with its class colour; returns each instance's colour.

    A class takes ``PALETTE[i % 20]`` at its first instance ``i``; its k-th instance (counting
    empty masks, as PaddleX does) is that colour lightened ``_SHADE_STEPS[k % 3]`` times, so repeats
    stay distinguishable without fading to white. The arithmetic mirrors PaddleX (float32
    canvas, ``*= 0.3`` then ``+= 0.7 * colour``, a single uint8 cast at the end), so overlapping
    masks give the same pixel values; the float canvas only spans the union of the mask regions.
    """
    regions = _mask_regions(instances)
    union = _union(regions)
    class_base: dict[int, Color] = {}
    class_count: dict[int, int] = {}
    instance_colors: list[list[int]] = []
    keep = np.float32(1.0 - MASK_ALPHA)
    canvas = None
    if union is not None:
        ux0, uy0, ux1, uy1 = union
        canvas = rgb[uy0:uy1, ux0:ux1].astype(np.float32)
    for i, region in enumerate(regions):
        cid = int(instances.class_ids[i])
        k = class_count[cid] = class_count.get(cid, -1) + 1
        color = _shade(class_base.setdefault(cid, PALETTE[i % len(PALETTE)]), _SHADE_STEPS[k % len(_SHADE_STEPS)])
        instance_colors.append(color)
        if region is None:
            continue
        crop = _mask_crop(instances, i, region)
        x0, y0, x1, y1 = region
        sub = canvas[y0 - uy0:y1 - uy0, x0 - ux0:x1 - ux0]
        # Blend the whole rectangle, keep it where the mask is: faster than boolean indexing.
        np.copyto(sub, sub * keep + MASK_ALPHA * np.asarray(color), where=crop[..., None])
    if canvas is not None:
        rgb[uy0:uy1, ux0:ux1] = canvas.astype(np.uint8)
    return instance_colors


# ---------------------------------------------------------------------------------------------
# box models


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@lru_cache(maxsize=16)
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font exists
        return ImageFont.load_default()


def _box_colors(instances: Instances, labels: Sequence[str]) -> list[tuple[str, int]]:
    """(label, palette index) per instance; a label keeps the index of its first instance."""
    first: dict[str, int] = {}
    out = []
    for i, cid in enumerate(instances.class_ids):
        label = label_for(labels, int(cid))
        out.append((label, first.setdefault(label, i % len(PALETTE))))
    return out


def _draw_box_model(rgb: np.ndarray, instances: Instances, labels: Sequence[str]) -> Image.Image:
    _blend_masks(rgb, instances)
    image = Image.fromarray(rgb)
    width, height = image.size
    thickness = max(1, int(max(width, height) * 0.002))
    font = _font(_text_px(width))
    draw = ImageDraw.Draw(image)
    for (label, pidx), box, score in zip(_box_colors(instances, labels), instances.boxes, instances.scores):
        x1, y1, x2, y2 = (float(v) for v in box)
        color = PALETTE[pidx]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=thickness)
        text_color = _WHITE if pidx in _WHITE_TEXT_INDICES else _DARK_TEXT
        _draw_tag(draw, f"{label} {float(score):.2f}", x1, y1, font, color, text_color)
    return image


def _draw_tag(draw: ImageDraw.ImageDraw, text: str, x: float, y: float, font: Font, fill: Color,
              text_color: Color) -> None:
    """A filled tag holding ``text`` just above ``(x, y)``, or just below it near the image top."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    tag_y = y - tag_h if y >= tag_h else y
    draw.rectangle([x, tag_y, x + tag_w, tag_y + tag_h], fill=fill)
    draw.text((x + pad - left, tag_y + pad - top), text, fill=text_color, font=font)


# ---------------------------------------------------------------------------------------------
# SOLOv2


def _draw_solov2(rgb: np.ndarray, instances: Instances, labels: Sequence[str]) -> Image.Image:
    colors = _blend_masks(rgb, instances)
    h, w = instances.image_size
    # cv2's Hershey simplex is about 22 px high at scale 1: the same height as the box models' text
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, _text_px(w) / 22.0
    weight = max(1, round(scale))
    line = max(1, int(max(w, h) * 0.002))  # as the box models' boxes
    for i, color in enumerate(colors):
        x0, y0, x1, y1 = (round(float(v)) for v in instances.boxes[i])  # exclusive mask extent
        if min(x1, w) <= max(x0, 0) or min(y1, h) <= max(y0, 0):
            continue  # empty mask: nothing to frame
        color_t = tuple(int(c) for c in color)
        cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), color_t, line)
        text = "%s %.2f" % (label_for(labels, int(instances.class_ids[i])), float(instances.scores[i]))
        (tw, th), baseline = cv2.getTextSize(text, font, scale, weight)
        tag_h = th + baseline + 2
        top = y0 - tag_h if y0 >= tag_h else y0  # inside the rectangle when it touches the top
        cv2.rectangle(rgb, (x0, top), (x0 + tw, top + tag_h), color_t, -1)
        cv2.putText(rgb, text, (x0, top + th + 1), font, scale, (0, 0, 0), weight, cv2.LINE_AA)
    return Image.fromarray(rgb)
