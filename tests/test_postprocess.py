import numpy as np
import pytest

from instseg_core.inference.postprocess import (OutputFormatError, box_instances, solov2_instances,
                                               split_box_outputs)


def _full(h, w, y1, x1, y2, x2, val=1):
    m = np.zeros((h, w), np.int32)
    m[y1:y2, x1:x2] = val
    return m


def test_threshold_is_strict_and_fake_rows_dropped():
    rows = np.array([[0, 0.5, 1, 1, 5, 5], [1, 0.51, 1, 1, 5, 5], [-1, 0.9, 0, 0, 1, 1]], np.float32)
    masks = np.stack([_full(10, 10, 1, 1, 5, 5)] * 3)
    inst = box_instances(rows, masks, (10, 10), 0.5)
    assert inst.class_ids.tolist() == [1]


def test_degenerate_box_drops_its_own_mask():
    # row 0 lies right of the image: after clipping x1 >= x2, so it is dropped. PaddleX would then pair
    # row 1's box with row 0's mask; here each kept box keeps its own mask.
    rows = np.array([[3, 0.9, 12, 1, 14, 5], [1, 0.8, 0, 0, 4, 4], [2, 0.7, 5, 5, 9, 9]], np.float32)
    masks = np.stack([_full(10, 10, 0, 8, 10, 10), _full(10, 10, 0, 0, 4, 4), _full(10, 10, 5, 5, 9, 9)])
    inst = box_instances(rows, masks, (10, 10), 0.5)
    assert inst.class_ids.tolist() == [1, 2]
    assert inst.dense_masks()[0, :4, :4].all() and inst.dense_masks()[0].sum() == 16
    assert inst.dense_masks()[1, 5:9, 5:9].all() and inst.dense_masks()[1].sum() == 16


def test_boxes_clipped_to_image():
    rows = np.array([[0, 0.9, -3.5, 2.25, 12.0, 20.0]], np.float32)
    inst = box_instances(rows, _full(10, 12, 0, 0, 10, 12)[None], (10, 12), 0.1)
    np.testing.assert_array_equal(inst.boxes, [[0, 2.25, 12, 10]])


def test_batch_padding_is_cropped_and_minus_one_is_background():
    masks = np.full((1, 12, 16), -1, np.int32)
    masks[0, :10, :8] = _full(10, 8, 2, 2, 6, 6)
    inst = box_instances(np.array([[0, 0.9, 2, 2, 6, 6]], np.float32), masks, (10, 8), 0.5)
    assert inst.dense_masks().shape == (1, 10, 8) and inst.dense_masks().sum() == 16


def test_masks_sized_from_another_image_are_resized():
    masks = _full(20, 20, 0, 0, 10, 10)[None]
    inst = box_instances(np.array([[0, 0.9, 0, 0, 20, 40]], np.float32), masks, (40, 40), 0.5)
    assert inst.dense_masks().shape == (1, 40, 40) and inst.dense_masks().sum() == 400


def test_masks_one_pixel_short_are_padded_not_resized():
    # PP-YOLOE's canvas is floor(im_shape / scale_factor): 599 rows for a 600-row image, same grid
    masks = _full(9, 12, 3, 2, 9, 6)[None]
    inst = box_instances(np.array([[0, 0.9, 2, 3, 6, 10]], np.float32), masks, (10, 12), 0.5)
    dense = inst.dense_masks()
    assert dense.shape == (1, 10, 12)
    np.testing.assert_array_equal(dense[0, :9], masks[0] > 0)  # not shifted
    assert not dense[0, 9].any()


def test_split_by_bbox_num_and_format_errors():
    bbox = np.zeros((5, 6), np.float32)
    mask = np.zeros((5, 4, 4), np.int32)
    parts = split_box_outputs([bbox, np.array([2, 3], np.int32), mask], 2)
    assert [len(r) for r, _ in parts] == [2, 3]
    with pytest.raises(OutputFormatError, match="bbox_num"):
        split_box_outputs([bbox, np.array([5], np.int32), mask], 2)
    with pytest.raises(OutputFormatError, match="3 outputs"):
        split_box_outputs([bbox, mask], 1)


def test_solov2_threshold_inclusive_and_boxes_from_masks():
    segm = np.stack([_full(10, 10, 1, 2, 4, 6).astype(np.uint8), np.ones((10, 10), np.uint8)])
    out = [np.array(2), np.array([5, 0]), np.array([0.5, 0.0], np.float32), segm]
    inst = solov2_instances(out, (10, 10), 0.5)
    assert inst.class_ids.tolist() == [5] and inst.boxes_from_masks
    np.testing.assert_array_equal(inst.boxes, [[2, 1, 6, 4]])
    assert len(solov2_instances(out, (10, 10), 0.0)) == 2
    # strict (the evaluator's rule, as the box models): score 0 padding rows go, 0.5 > 0.5 is false
    assert solov2_instances(out, (10, 10), 0.0, strict=True).class_ids.tolist() == [5]
    assert len(solov2_instances(out, (10, 10), 0.5, strict=True)) == 0
