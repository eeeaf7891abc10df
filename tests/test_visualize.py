"""Overlay drawing: colours (not BGR-swapped), PaddleX blending values, SOLOv2 path, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from instseg_core import masks as M
from instseg_core.structures import Instances
from instseg_core.visualize import PALETTE, draw_instances

H, W = 120, 160


def _image(bgr: tuple[int, int, int]) -> np.ndarray:
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[:] = bgr
    return img


def _square_instances(n_same_class: int = 1, solo: bool = False) -> Instances:
    masks = np.zeros((n_same_class, H, W), dtype=bool)
    boxes = []
    for k in range(n_same_class):  # side by side, far from the top so tags sit above the boxes
        x0 = 20 + 50 * k
        masks[k, 60:100, x0:x0 + 40] = True
        boxes.append([x0, 60, x0 + 40, 100])
    return Instances(np.array(boxes), [0.9] * n_same_class, [0] * n_same_class, masks, (H, W),
                     boxes_from_masks=solo)


def test_returns_rgb_pil_image_and_keeps_input():
    img = _image((255, 0, 0))
    before = img.copy()
    out = draw_instances(img, _square_instances(), ["person"])
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (W, H)
    assert np.array_equal(img, before)


def test_colours_not_swapped_outside_masks():
    out = np.asarray(draw_instances(_image((255, 0, 0)), _square_instances(), ["person"]))  # pure blue BGR
    assert tuple(out[5, 150]) == (0, 0, 255)  # blue in RGB
    assert tuple(out[115, 5]) == (0, 0, 255)


def test_mask_blending_matches_paddlex_values():
    # Red background, class 0 colour (255,0,0) whitened to (255,102,102): 0.3*bg + 0.7*colour.
    out = np.asarray(draw_instances(_image((0, 0, 255)), _square_instances(2), ["person"]))
    assert tuple(out[80, 40]) == (255, 71, 71)
    # The second instance of the same class is whitened again: (255,163,163) -> (255,114,114).
    assert tuple(out[80, 90]) == (255, 114, 114)


def _big_black() -> np.ndarray:
    return np.zeros((400, 600, 3), dtype=np.uint8)  # wide enough for a legible font (size 12)


def test_box_and_tag_drawn_in_palette_colour():
    inst = Instances(np.array([[100, 200, 300, 350]]), [0.9], [0], np.zeros((1, 400, 600), bool), (400, 600))
    out = np.asarray(draw_instances(_big_black(), inst, ["person"]))
    assert tuple(out[300, 100]) == PALETTE[0]  # left edge (line width int(600 * 0.002) = 1)
    assert tuple(out[300, 102]) == (0, 0, 0)
    tag = {tuple(int(v) for v in c) for c in out[180:200, 101:160].reshape(-1, 3)}  # above the box
    assert PALETTE[0] in tag and (255, 255, 255) in tag  # red fill, white text


def test_tag_goes_inside_box_near_top():
    inst = Instances(np.array([[100, 0, 300, 150]]), [0.5], [0], np.zeros((1, 400, 600), bool), (400, 600))
    out = np.asarray(draw_instances(_big_black(), inst, ["person"]))
    tag = {tuple(int(v) for v in c) for c in out[2:14, 101:160].reshape(-1, 3)}
    assert PALETTE[0] in tag and (255, 255, 255) in tag


def test_dark_text_for_light_palette_entries():
    inst = Instances(np.array([[20, 200, 200, 300], [300, 200, 500, 300]]), [0.9, 0.8], [0, 1],
                     np.zeros((2, 400, 600), dtype=bool), (400, 600))
    out = np.asarray(draw_instances(_big_black(), inst, ["a", "b"]))
    tag = {tuple(int(v) for v in c) for c in out[180:200, 301:330].reshape(-1, 3)}  # label "b": palette 1
    assert PALETTE[1] in tag and (20, 14, 53) in tag


def test_all_zero_masks_and_empty_instances():
    img = _image((10, 20, 30))
    empty = Instances.empty((H, W))
    assert np.array_equal(np.asarray(draw_instances(img, empty, [])), img[..., ::-1])
    zero = Instances(np.array([[5, 5, 50, 50]]), [0.9], [0], np.zeros((1, H, W), dtype=bool), (H, W))
    draw_instances(img, zero, ["x"])
    solo_zero = Instances(np.zeros((1, 4)), [0.9], [0], np.zeros((1, H, W), dtype=bool), (H, W),
                          boxes_from_masks=True)
    out = np.asarray(draw_instances(img, solo_zero, ["x"]))
    assert np.array_equal(out, img[..., ::-1])


def test_mask_outside_its_box_is_not_drawn():
    # PaddleX crops masks to their box before drawing; pixels beyond the box stay untouched.
    masks = np.zeros((1, H, W), dtype=bool)
    masks[0, 60:110, 20:60] = True
    inst = Instances(np.array([[20, 60, 60, 100]]), [0.9], [0], masks, (H, W))
    out = np.asarray(draw_instances(_image((0, 0, 255)), inst, ["person"]))
    assert tuple(out[105, 40]) == (255, 0, 0)
    assert tuple(out[80, 40]) == (255, 71, 71)


def test_solov2_path():
    inst = _square_instances(1, solo=True)
    inst.boxes = M.masks_to_xyxy(inst.masks)
    out = np.asarray(draw_instances(_image((0, 0, 255)), inst, ["person"]))
    assert tuple(out[80, 40]) == (255, 71, 71)  # same blending
    assert tuple(out[80, 20]) == (255, 102, 102)  # 1-px rectangle in the whitened colour
    assert tuple(out[80, 59]) == (255, 102, 102)
    assert tuple(out[80, 61]) == (255, 0, 0)


def test_rle_instances_draw_like_dense():
    img = _image((40, 80, 120))
    dense = _square_instances(2)
    a = np.asarray(draw_instances(img, dense, ["person"]))
    b = np.asarray(draw_instances(img, dense.to_rle(), ["person"]))
    assert np.array_equal(a, b)


def test_image_size_mismatch_is_reported():
    with pytest.raises(ValueError, match="does not match"):
        draw_instances(np.zeros((10, 10, 3), np.uint8), _square_instances(), ["person"])


def test_many_instances_of_one_class_stay_visible():
    """17 'star' masks of one class: each keeps a saturated colour (PaddleX lightens once more per
    instance, so the later ones come out near white on a white background and vanish)."""
    h, w = 200, 360
    masks = np.zeros((17, h, w), dtype=bool)
    boxes = []
    for k in range(17):
        x0, y0 = 10 + 20 * k, 80
        masks[k, y0:y0 + 15, x0:x0 + 15] = True
        boxes.append([x0, y0, x0 + 15, y0 + 15])
    inst = Instances(np.array(boxes, float), [0.9] * 17, [0] * 17, masks, (h, w))
    out = np.asarray(draw_instances(np.full((h, w, 3), 255, np.uint8), inst, ["star"])).astype(int)
    inside = [out[87, 17 + 20 * k] for k in range(17)]
    assert all(px.max() - px.min() >= 60 for px in inside), [tuple(p) for p in inside]  # a colour, not white
    paddlex_17th = np.array(PALETTE[0], float)
    for _ in range(17):  # PaddleX's rule: lightened once per instance
        paddlex_17th = np.floor(paddlex_17th * 0.6 + 102)
    assert np.ptp(0.3 * 255 + 0.7 * paddlex_17th) < 2  # what this test guards against: white on white
    assert len({tuple(p) for p in inside[:3]}) == 3  # neighbours of one class are told apart


@pytest.mark.parametrize("solo", [False, True])
def test_label_text_scales_with_the_image(solo):
    """Tags are at least 10 px high on a 160 px image and grow with a 4000 px photo (both styles)."""
    for (h, w), low, high in [((120, 160), 10, 30), ((3000, 4000), 50, 140)]:
        masks = np.zeros((1, h, w), dtype=bool)
        y0, x0 = h // 2, w // 4
        masks[0, y0:y0 + h // 4, x0:x0 + w // 4] = True
        inst = Instances(np.array([[x0, y0, x0 + w // 4, y0 + h // 4]], float), [0.9], [0], masks, (h, w),
                         boxes_from_masks=solo)
        out = np.asarray(draw_instances(np.zeros((h, w, 3), np.uint8), inst, ["person"]))
        column = out[:y0, x0 + 2]  # the tag sits on top of the box's left edge
        tag_rows = int(np.any(column != 0, axis=1).sum())
        assert low <= tag_rows <= high, (solo, w, tag_rows)
