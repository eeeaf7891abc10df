"""Overlay drawing (PaddleX 3.x look, without its colour bug): predictions and dataset annotations.

:func:`draw_instances` draws predicted ``Instances`` in two styles, chosen by
``Instances.boxes_from_masks``:

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

:func:`draw_annotations` draws ground-truth annotations in the look of PaddleX's dataset checker
(``check_dataset``'s demo images): each mask in its own palette colour whitened by 0.4 and blended
with alpha 0.6, boxes and category-name tags coloured per category, tag text white or dark navy
as the checker picks it. It shares the palette, the blending, the font, the boxes and the tags
with the prediction overlay. Deliberate differences from PaddleX's checker: masks are drawn
before boxes and tags (PaddleX draws them over the tags, which become hard to read); Pillow's
default font; box lines at least 1 px.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Hashable, Iterable, Sequence

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

# PaddleX's dataset-checker look, for annotations (see `draw_annotations`)
ANNOTATION_MASK_ALPHA = 0.6
ANNOTATION_WHITENING = 0.4  # share of white mixed into a mask's palette colour

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels


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


def _blend(sub: np.ndarray, mask: np.ndarray, color: Sequence[float] | np.ndarray, alpha: float) -> None:
    """``sub`` (a float32 canvas view) becomes ``(1 - alpha) * sub + alpha * color`` where ``mask`` is set.

    The whole rectangle is blended and kept only under the mask: faster than boolean indexing.
    """
    np.copyto(sub, sub * np.float32(1 - alpha) + alpha * np.asarray(color), where=mask[..., None])


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
        _blend(canvas[y0 - uy0:y1 - uy0, x0 - ux0:x1 - ux0], crop, color, MASK_ALPHA)
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
        _draw_labelled_box(draw, tuple(float(v) for v in box), f"{label} {float(score):.2f}", pidx, thickness, font)
    return image


def _draw_labelled_box(draw: ImageDraw.ImageDraw, box: Box, text: str, pidx: int, width: int, font: Font) -> None:
    """A box outlined in ``PALETTE[pidx]`` with ``text`` on a tag of that colour at its top-left corner.

    The text is white or dark navy by palette entry, as PaddleX picks it (``font_colormap``).
    """
    color = PALETTE[pidx]
    draw.rectangle(list(box), outline=color, width=width)
    _draw_tag(draw, text, box[0], box[1], font, color, _WHITE if pidx in _WHITE_TEXT_INDICES else _DARK_TEXT)


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


# ---------------------------------------------------------------------------------------------
# dataset annotations (check_dataset's demo images)


def draw_annotations(image_rgb: np.ndarray, masks: Iterable[np.ndarray | None], boxes: Sequence[Box | None],
                     categories: Sequence[Hashable], names: Sequence[str]) -> Image.Image:
    """Draw ground-truth annotations over an RGB image, as PaddleX's dataset checker does; a PIL image.

    Annotation ``i`` has a full-image mask ``masks[i]`` (bool ``[H, W]``, or None for none), a
    box ``boxes[i]`` (``(x0, y0, x1, y1)``, or None for none), a category key ``categories[i]``
    and the text of its tag ``names[i]``. ``masks`` is consumed one mask at a time, so a
    generator keeps a single decoded mask in memory.

    Mask colour: ``PALETTE[i % 20]`` whitened by ``ANNOTATION_WHITENING``, blended with
    ``ANNOTATION_MASK_ALPHA``. Box and tag colour: per category, ``PALETTE[rank % 20]`` with the
    categories ranked by how many annotations they have in this image (ties keep first-seen
    order). Box lines are ``0.005 * max(W, H)`` (at least 1 px), the font ``0.024 * W + 2`` px.
    """
    height, width = image_rgb.shape[:2]
    canvas = image_rgb.astype(np.float32)
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        # Blend only inside the mask's extent: far cheaper than the whole image.
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        _blend(canvas[y0:y1, x0:x1], mask[y0:y1, x0:x1], _whitened(PALETTE[i % len(PALETTE)]), ANNOTATION_MASK_ALPHA)
    image = Image.fromarray(canvas.astype(np.uint8))

    rank = {cat: r for r, (cat, _) in enumerate(Counter(categories).most_common())}  # most_common is stable
    draw = ImageDraw.Draw(image)
    line = max(1, int(max(width, height) * 0.005))
    font = _font(int(0.024 * width) + 2)
    for box, cat, text in zip(boxes, categories, names):
        if box is not None:
            _draw_labelled_box(draw, box, text, rank[cat] % len(PALETTE), line, font)
    return image


def _whitened(color: Color) -> np.ndarray:
    return np.asarray(color, dtype=np.float32) * (1 - ANNOTATION_WHITENING) + 255 * ANNOTATION_WHITENING
