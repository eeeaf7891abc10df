"""PP-YOLOE_seg-S training: task-aligned assigner, losses against numpy, and a few real steps."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import paddle
import pytest

from instseg_core.modeling.losses.ppyoloe_loss import (distribution_focal_loss, downsample_masks,
                                                       ltrb_targets, prototype_mask_loss,
                                                       varifocal_loss)
from instseg_core.modeling.losses.task_aligned_assigner import (TaskAlignedAssigner,
                                                                points_inside_boxes)

COCO_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny_val2017"
TERMS = ("loss", "loss_cls", "loss_iou", "loss_dfl", "loss_mask", "loss_l1")


def _t(x, dtype="float32"):
    return paddle.to_tensor(np.asarray(x, dtype=dtype))


# ------------------------------------------------------------------------------------- assigner
# Four anchor points and two GT boxes side by side that overlap on x in [2, 4]:
#   p0 = (1, 1) inside a only, p1 = (3, 1) inside a and b, p2 = (5, 1) inside b only, p3 outside.
POINTS = [[1, 1], [3, 1], [5, 1], [9, 9]]
GT_BOXES = [[[0, 0, 4, 2], [2, 0, 6, 2]]]  # a (label 0), b (label 1)
GT_LABELS = [[0, 1]]


def _assign(p1_box, topk):
    pred_boxes = [[[0, 0, 4, 2], p1_box, [4, 0, 6, 2], [8, 8, 10, 10]]]
    scores = np.full([1, 4, 2], 0.5, np.float32)  # class scores tie: the metric ranks by IoU
    assigner = TaskAlignedAssigner(topk=topk, alpha=1.0, beta=6.0)
    return assigner(_t(scores), _t(pred_boxes), _t(POINTS), _t(GT_LABELS, "int64"), _t(GT_BOXES),
                    _t([[True, True]], "bool"))


def test_assigner_conflict_goes_to_highest_iou_and_soft_targets():
    # p1 predicts a box close to b: IoU(b) = 7/8, IoU(a) = 3/12
    out = _assign([2.5, 0, 6, 2], topk=2)
    assert out.positive.numpy().tolist() == [[True, True, True, False]]
    assert out.labels.numpy().tolist() == [[0, 1, 1, 2]]  # background label = num_classes
    assert out.gt_index.numpy()[0, :3].tolist() == [0, 1, 1]
    np.testing.assert_allclose(out.boxes.numpy()[0], [[0, 0, 4, 2], [2, 0, 6, 2], [2, 0, 6, 2], [0] * 4])
    # soft targets: a's only positive gets IoU 1; b's best (p1) gets its IoU 0.875, p2 its metric ratio
    s = out.scores.numpy()[0]
    expected_p2 = 0.875 * (0.5 ** 6) / (0.875 ** 6)
    np.testing.assert_allclose(s[:, 0], [1.0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(s[:, 1], [0, 0.875, expected_p2, 0], rtol=1e-5, atol=1e-7)

    # p1 now predicts a box close to a: the conflict resolves the other way
    out = _assign([0, 0, 3.5, 2], topk=2)
    assert out.labels.numpy().tolist() == [[0, 0, 1, 2]]
    s = out.scores.numpy()[0]
    np.testing.assert_allclose(s[:2, 0], [1.0, 0.875 ** 6], rtol=1e-5)  # metric ratio x max IoU 1
    np.testing.assert_allclose(s[2, 1], 0.5, rtol=1e-5)  # b's only positive scores its IoU


def test_assigner_topk_limits_candidates():
    out = _assign([2.5, 0, 6, 2], topk=1)
    # a keeps p0 (IoU 1), b keeps p1 (IoU .875 beats p2's .5); p2 is no longer a candidate
    assert out.labels.numpy().tolist() == [[0, 1, 2, 2]]
    np.testing.assert_allclose(out.scores.numpy()[0].max(-1), [1.0, 0.875, 0, 0], rtol=1e-5)


def test_assigner_ignores_padding_rows_and_empty_batches():
    assigner = TaskAlignedAssigner(topk=13)
    pred = _t([[[0, 0, 4, 2]] * 4] * 2)
    scores = _t(np.full([2, 4, 3], 0.5))
    points = _t(POINTS)
    # image 1 has no instance: its padded row (label 0, zero box) must assign nothing
    out = assigner(scores, pred, points, _t([[0], [0]], "int64"), _t([[[0, 0, 4, 2]], [[0, 0, 0, 0]]]),
                   _t([[True], [False]], "bool"))
    assert out.positive.numpy()[1].sum() == 0 and (out.labels.numpy()[1] == 3).all()
    assert out.positive.numpy()[0].tolist() == [True, True, False, False]
    # no GT at all in the batch
    out = assigner(scores, pred, points, paddle.zeros([2, 0], "int64"), paddle.zeros([2, 0, 4]),
                   paddle.zeros([2, 0], "bool"))
    assert (out.labels.numpy() == 3).all() and float(out.scores.sum()) == 0.0


def test_points_inside_boxes_is_strict():
    inside = points_inside_boxes(_t([[1, 1], [0, 1], [4, 1], [2, 2.5]]), _t([[[0, 0, 4, 2]]]))
    assert inside.numpy().tolist() == [[[True, False, False, False]]]


# ------------------------------------------------------------------------------------- losses
def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_varifocal_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 5)).astype(np.float32) * 3
    label = np.zeros_like(logits)
    label[0, 1, 2] = label[1, 4, 0] = label[1, 6, 4] = 1
    score = label * rng.uniform(0.1, 0.9, size=logits.shape).astype(np.float32)
    p = _np_sigmoid(logits.astype(np.float64))
    bce = -(score * np.log(p) + (1 - score) * np.log(1 - p))
    weight = 0.75 * p ** 2 * (1 - label) + score * label
    got = float(varifocal_loss(_t(logits), _t(score), _t(label), alpha=0.75, gamma=2.0))
    assert got == pytest.approx(float((bce * weight).sum()), rel=1e-5)


def test_distribution_focal_loss_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4, 17)).astype(np.float32)
    target = rng.uniform(0, 15.99, size=(6, 4)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    left = np.floor(target).astype(int)
    wl = left + 1 - target
    n, s = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
    expected = (-logp[n, s, left] * wl - logp[n, s, left + 1] * (1 - wl)).mean(-1)
    got = distribution_focal_loss(_t(logits), _t(target)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # targets are clipped so the right neighbour bin exists
    t = ltrb_targets(_t([[1, 1]]), _t([[-30, 0.5, 2, 40]]), reg_max=16).numpy()
    np.testing.assert_allclose(t, [[15.99, 0.5, 1, 15.99]], rtol=1e-6)


def test_prototype_mask_loss_matches_numpy():
    rng = np.random.default_rng(2)
    coefs = rng.normal(size=(3, 4)).astype(np.float32)
    protos = rng.normal(size=(4, 6, 8)).astype(np.float32)
    gt = (rng.uniform(size=(3, 6, 8)) > 0.5).astype(np.float32)
    boxes = np.array([[0, 0, 8, 6], [1.5, 2, 5, 4], [2, 1, 3, 2]], np.float32)
    logits = np.einsum("pm,mhw->phw", coefs, protos).astype(np.float64)
    p = _np_sigmoid(logits)
    bce = -(gt * np.log(p) + (1 - gt) * np.log(1 - p))
    expected = []
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        rows, cols = np.arange(6)[:, None], np.arange(8)[None, :]
        inside = (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)
        expected.append((bce[k] * inside).sum() / ((x2 - x1) * (y2 - y1)))
    got = prototype_mask_loss(_t(coefs), _t(protos), _t(gt), _t(boxes)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_downsample_masks_averages_blocks():
    m = np.zeros((1, 8, 8), np.float32)
    m[0, :4, :2] = 1
    got = downsample_masks(_t(m), (2, 2)).numpy()
    np.testing.assert_allclose(got, [[[0.5, 0], [0, 0]]])
    assert downsample_masks(paddle.zeros([0, 8, 8]), (2, 2)).shape == [0, 2, 2]


# ------------------------------------------------------------------------------------- model
def _model():
    from instseg_core.modeling import build_model

    paddle.seed(0)
    model = build_model("PP-YOLOE_seg-S")
    model.yolo_head.init_prediction_priors()
    model.train()
    return model


def _empty_target(h, w):
    return {"labels": paddle.zeros([0], "int64"), "boxes": paddle.zeros([0, 4]),
            "masks": paddle.zeros([0, h, w])}


def test_images_without_instances_give_background_loss_only():
    model = _model()
    h, w = 64, 96  # not square: anchors follow the actual feature sizes
    image = paddle.rand([2, 3, h, w])
    losses = model({"image": image}, [_empty_target(h, w), _empty_target(h, w)])
    assert set(TERMS) <= set(losses)
    assert all(math.isfinite(float(losses[k])) for k in TERMS)
    for k in ("loss_iou", "loss_dfl", "loss_mask", "loss_l1"):
        assert float(losses[k]) == 0.0
    assert float(losses["loss"]) == pytest.approx(float(losses["loss_cls"])) and float(losses["loss"]) > 0
    losses["loss"].backward()

    # one image with an instance, one without
    mask = np.zeros((1, h, w), np.float32)
    mask[0, 8:40, 20:70] = 1
    target = {"labels": _t([3], "int64"), "boxes": _t([[20, 8, 70, 40]]), "masks": _t(mask)}
    losses = model({"image": image}, [target, _empty_target(h, w)])
    assert all(math.isfinite(float(losses[k])) for k in TERMS)
    assert float(losses["loss_iou"]) > 0 and float(losses["loss_mask"]) > 0


def test_training_forward_needs_targets():
    model = _model()
    with pytest.raises(ValueError, match="targets"):
        model({"image": paddle.rand([1, 3, 64, 64])})


def test_a_few_steps_on_coco_tiny_reduce_the_loss():
    ann = COCO_TINY / "annotations" / "instances_val2017_mini8.json"
    if not ann.exists():
        pytest.skip("shared/data/coco_tiny_val2017 not available")
    from instseg_core.training.data import CocoInstanceDataset, load_batch

    dataset = CocoInstanceDataset(ann, COCO_TINY / "val2017")
    inputs, targets = load_batch(dataset, [0, 1], size=320, seed=0)
    assert sum(int(t["labels"].shape[0]) for t in targets) > 0
    model = _model()
    opt = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters(), weight_decay=0.0)
    history = []
    for step in range(5):
        losses = model(inputs, targets)
        values = {k: float(losses[k]) for k in TERMS}
        assert all(math.isfinite(v) for v in values.values()), values
        history.append(values)
        losses["loss"].backward()
        if step == 0:
            stem = model.backbone.stem.conv1.conv.weight.grad
            assert stem is not None and float(stem.abs().sum()) > 0, "no gradient reached the backbone"
        opt.step()
        opt.clear_grad()
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < 0.8 * first, [round(h["loss"], 3) for h in history]
