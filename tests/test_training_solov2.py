"""SOLOv2 training: grid targets on hand-made masks, the losses against numpy, and real steps."""
from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from instseg_core.datasets.synthetic import make_image
from instseg_core.modeling.losses.solov2_loss import (SOLOv2Loss, centre_cell_region, dice_loss,
                                                      downsample_mask_targets, image_targets)
from instseg_core.modeling.solov2 import solov2
from training_utils import train_steps

GRIDS = (40, 36, 24, 16, 12)
H, W = 128, 160  # padded network input; the mask feature is 32 x 40


def _rect(y0, y1, x0, x1, hw=(H, W)):
    m = np.zeros(hw, np.float32)
    m[y0:y1, x0:x1] = 1
    return m


def _box(m):
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _targets(masks, labels):
    masks = np.stack(masks) if len(masks) else np.zeros((0, H, W), np.float32)
    boxes = np.array([_box(m) for m in masks], np.float32).reshape(-1, 4)
    return {"labels": paddle.to_tensor(np.asarray(labels, np.int64)), "boxes": paddle.to_tensor(boxes),
            "masks": paddle.to_tensor(masks)}


# ------------------------------------------------------------------------------- target generation
def test_small_instance_goes_to_level_0_cells_around_its_centre():
    # rows 20..39, cols 32..63: sqrt(20 * 32) = 25.3 -> level 0 only (scale range 1..96).
    # Centre of mass (29.5, 47.5); grid 40 cells are 3.2 px tall, 4 px wide: centre cell (9, 11).
    # Centre region +- (0.2 * 20 / 2, 0.2 * 32 / 2) = +- (2, 3.2) px: rows 27.5..31.5 -> 8..9,
    # cols 44.3..50.7 -> 11..12.
    a = _rect(20, 40, 32, 64)
    levels = image_targets(np.array([1]), np.array([_box(a)], np.float32), a[None], GRIDS)
    assert len(levels) == 5
    lv0 = levels[0]
    assert sorted(lv0.cells.tolist()) == [8 * 40 + 11, 8 * 40 + 12, 9 * 40 + 11, 9 * 40 + 12]
    cate = lv0.cate.reshape(40, 40)
    assert (cate[8:10, 11:13] == 2).all() and np.count_nonzero(cate) == 4  # class 1 -> 2 (0 = background)
    # mask target at stride 4: rows 5..9, cols 8..15 of the 32 x 40 mask feature, one per cell
    assert lv0.masks.shape == (4, 32, 40)
    expected = np.zeros((32, 40), np.float32)
    expected[5:10, 8:16] = 1
    for m in lv0.masks:
        np.testing.assert_array_equal(m, expected)
    for lv in levels[1:]:
        assert len(lv.cells) == 0 and lv.masks.shape == (0, 32, 40) and not lv.cate.any()


def test_large_instance_takes_two_levels_and_at_most_3x3_cells():
    # 120 x 120 px: sqrt = 120 lies in both 48..192 (level 1) and 96..384 (level 2).
    # Centre (59.5, 69.5); region +- 12 px would cover 6 x 7 cells of grid 36: clamped to 3 x 3.
    b = _rect(0, 120, 10, 130)
    levels = image_targets(np.array([0]), np.array([_box(b)], np.float32), b[None], GRIDS)
    assert [len(lv.cells) for lv in levels] == [0, 9, 9, 0, 0]
    # grid 36: centre cell (16, 15) -> rows 15..17, cols 14..16
    assert sorted(levels[1].cells.tolist()) == [r * 36 + c for r in (15, 16, 17) for c in (14, 15, 16)]
    # grid 24: centre cell (11, 10) -> rows 10..12, cols 9..11
    assert sorted(levels[2].cells.tolist()) == [r * 24 + c for r in (10, 11, 12) for c in (9, 10, 11)]
    assert set(levels[2].cate.tolist()) == {0, 1}


def test_centre_region_clamps_to_grid_and_later_instances_overwrite():
    # a region reaching past the image corner is cut at the grid border
    assert centre_cell_region((1.0, 1.0), (50.0, 50.0), (H, W), 40) == (0, 1, 0, 1)
    assert centre_cell_region((127.0, 159.0), (50.0, 50.0), (H, W), 40) == (38, 39, 38, 39)
    # two instances on the same cells: the later one's class wins, both pairs are kept
    a = _rect(20, 40, 32, 64)
    levels = image_targets(np.array([0, 1]), np.array([_box(a)] * 2, np.float32), np.stack([a, a]), GRIDS)
    assert len(levels[0].cells) == 8 and set(levels[0].cate.tolist()) == {0, 2}


def test_empty_masks_and_images_without_instances_give_no_targets():
    empty = np.zeros((1, H, W), np.float32)
    for labels, boxes, masks in [(np.array([0]), np.array([[10, 10, 50, 50]], np.float32), empty),
                                 (np.zeros(0, np.int64), np.zeros((0, 4), np.float32), empty[:0])]:
        levels = image_targets(labels, boxes, masks, GRIDS)
        assert all(len(lv.cells) == 0 and not lv.cate.any() for lv in levels)
        assert [lv.cate.size for lv in levels] == [s * s for s in GRIDS]


def test_downsample_mask_targets_takes_block_majority():
    m = np.zeros((1, 8, 8), np.float32)
    m[0, 0:4, 0:2] = 1  # half of block (0, 0): kept
    m[0, 4:5, 4:8] = 1  # a quarter of block (1, 1): dropped
    np.testing.assert_array_equal(downsample_mask_targets(m, 4)[0], [[1, 0], [0, 0]])
    with pytest.raises(ValueError):
        downsample_mask_targets(np.zeros((1, 6, 8)), 4)


# ----------------------------------------------------------------------------------------- losses
def test_dice_loss_identical_zero_disjoint_one():
    a = paddle.to_tensor(_rect(0, 16, 0, 16, (32, 32))[None])
    b = paddle.to_tensor(_rect(16, 32, 16, 32, (32, 32))[None])
    np.testing.assert_allclose(dice_loss(a, a).numpy(), [0.0], atol=1e-5)
    np.testing.assert_allclose(dice_loss(a, b).numpy(), [1.0], atol=1e-7)
    half = paddle.full([1, 32, 32], 0.5)
    # 2 * 0.5 * 256 / (0.25 * 1024 + 256 + 0.002)
    np.testing.assert_allclose(dice_loss(half, a).numpy(), [1 - 256 / 512.002], rtol=1e-6)


def _np_focal(logits, onehot, alpha=0.25, gamma=2.0):
    p = 1 / (1 + np.exp(-logits))
    ce = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
    pt = p * onehot + (1 - p) * (1 - onehot)
    return ((alpha * onehot + (1 - alpha) * (1 - onehot)) * (1 - pt) ** gamma * ce).sum()


def test_solov2_loss_matches_numpy():
    # two levels (grids 4 and 2) over a 32 x 32 input, mask feature 8 x 8 with 3 channels, 2 classes;
    # image 1 has no instance
    grids, ranges = (4, 2), ((1, 16), (20, 64))
    rng = np.random.default_rng(0)
    m0 = _rect(2, 14, 2, 14, (32, 32))  # 12 px: level 0, centre (7.5, 7.5) -> cells (0..1, 0..1)
    m1 = _rect(4, 28, 2, 32, (32, 32))  # 26.8 px: level 1, centre (15.5, 16.5) -> all 4 cells
    targets = [{"labels": paddle.to_tensor(np.array([1, 0])), "boxes": paddle.to_tensor(
                    np.array([_box(m0), _box(m1)], np.float32)), "masks": paddle.to_tensor(np.stack([m0, m1]))},
               {"labels": paddle.zeros([0], "int64"), "boxes": paddle.zeros([0, 4]),
                "masks": paddle.zeros([0, 32, 32])}]
    cate = [rng.normal(size=(2, 2, s, s)).astype(np.float32) for s in grids]
    kern = [rng.normal(size=(2, 3, s, s)).astype(np.float32) for s in grids]
    feat = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    crit = SOLOv2Loss(num_classes=2, num_grids=grids, scale_ranges=ranges)
    out = crit([paddle.to_tensor(c) for c in cate], [paddle.to_tensor(k) for k in kern],
               paddle.to_tensor(feat), targets)

    per_image = [image_targets(np.array([1, 0]), np.array([_box(m0), _box(m1)]), np.stack([m0, m1]),
                               grids, ranges), None]
    assert [len(lv.cells) for lv in per_image[0]] == [4, 4]
    dice, focal, num_pos = [], 0.0, 0
    for lvl, s in enumerate(grids):
        for b in range(2):
            lab = per_image[0][lvl].cate if b == 0 else np.zeros(s * s, np.int64)
            num_pos += np.count_nonzero(lab)
            onehot = np.eye(3)[lab][:, 1:]
            focal += _np_focal(cate[lvl][b].transpose(1, 2, 0).reshape(-1, 2), onehot)
        lt = per_image[0][lvl]
        for cell, target in zip(lt.cells, lt.masks):
            k = kern[lvl][0].reshape(3, -1)[:, cell]
            p = 1 / (1 + np.exp(-(k @ feat[0].reshape(3, -1))))
            t = target.reshape(-1)
            dice.append(1 - 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum() + 0.002))
    assert num_pos == 8
    np.testing.assert_allclose(float(out["loss_cate"]), focal / (num_pos + 1), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_ins"]), 3.0 * np.mean(dice), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), float(out["loss_ins"]) + float(out["loss_cate"]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        bad = dict(targets[0], labels=paddle.to_tensor(np.array([2, 0])))
        crit([paddle.to_tensor(c) for c in cate], [paddle.to_tensor(k) for k in kern],
             paddle.to_tensor(feat), [bad, targets[1]])


# ------------------------------------------------------------------------------------- real steps
def _synthetic_batch(n_images, seed=0, empty=()):
    """128 x 128 synthetic images zero-padded to 128 x 160 (ImageNet-normalised); images whose
    index is in ``empty`` have no instance."""
    rng = np.random.default_rng(seed)
    batch = np.zeros((n_images, 3, H, W), np.float32)
    targets = []
    for i in range(n_images):
        img, inst = make_image(rng, 128, 3)
        x = (img[..., ::-1].astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        batch[i, :, :, :128] = x.transpose(2, 0, 1)
        if i in empty:
            inst = []
        masks = [np.pad(m.astype(np.float32), ((0, 0), (0, W - 128))) for _, m in inst]
        targets.append(_targets(masks, [c % 2 for c, _ in inst]))
    inputs = {"image": paddle.to_tensor(batch),
              "im_shape": paddle.to_tensor([[128.0, 128.0]] * n_images),
              "scale_factor": paddle.ones([n_images, 2])}
    return inputs, targets


def _slim_model(freeze_backbone: bool = True):
    """A narrow SOLOv2 (official grids and losses, 64-channel heads), by default with a frozen
    backbone: the training path at a cost this busy CPU can run many steps of. (The official
    512-wide heads cost ~50 s per step here, whatever the input size: the grids are fixed.)"""
    paddle.seed(0)
    model = solov2(num_classes=2, fpn_channels=64, seg_feat_channels=64, stacked_convs=2,
                   kernel_out_channels=64, mask_mid_channels=32)
    if freeze_backbone:
        for p in model.backbone.parameters():
            p.stop_gradient = True
    model.train()
    return model


def _grad_norm(model, name):
    p = dict(model.named_parameters())[name]
    return 0.0 if p.grad is None else float(p.grad.abs().sum())


def _check_losses(out):
    assert set(out) == {"loss", "loss_ins", "loss_cate"}
    for k, v in out.items():
        assert v.shape in ([], [1]) and math.isfinite(float(v)) and float(v) > 0, (k, float(v))


@pytest.mark.slow
def test_official_model_training_forward():
    paddle.seed(0)
    model = solov2(num_classes=2)
    model.train()
    inputs, targets = _synthetic_batch(1)
    assert len(targets[0]["labels"]) > 0
    cate, kernels, feat = model.head_outputs(inputs["image"])
    # training mode: raw category logits, channel-first (eval gives point-NMS'd scores, channel-last)
    assert [c.shape for c in cate] == [[1, 2, s, s] for s in GRIDS]
    assert [k.shape for k in kernels] == [[1, 256, s, s] for s in GRIDS] and feat.shape == [1, 256, 32, 40]
    crit = model.criterion
    _check_losses(crit(cate, kernels, feat, targets))


def test_training_step_reaches_every_branch():
    model = _slim_model(freeze_backbone=False)
    inputs, targets = _synthetic_batch(1)
    out = model(inputs, targets)
    _check_losses(out)
    out["loss"].backward()
    for name in ("solov2_head.bbox_head.solo_kernel.weight",  # kernel branch
                 "solov2_head.bbox_head.kernel_convs.0.conv.weight",
                 "solov2_head.bbox_head.solo_cate.weight",  # category branch
                 "solov2_head.bbox_head.cate_convs.0.conv.weight",
                 "mask_head.mask_feat_head.conv_pred.0.conv.weight",  # mask feature
                 "mask_head.conv_pre_feat3.mask_feat_head.convs_all_levels.3.conv0.conv.weight",
                 "neck.fpn_inner_res4_sum_lateral.weight",
                 "backbone.res5.res5c.branch2c.conv.weight"):
        assert _grad_norm(model, name) > 0, name


def test_training_forward_needs_targets():
    model = _slim_model()
    inputs, _ = _synthetic_batch(1)
    with pytest.raises(ValueError, match="targets"):
        model(inputs)


def test_images_without_instances_train():
    model = _slim_model()
    # one image with instances and one without, then a batch with no instance at all
    inputs, targets = _synthetic_batch(2, empty=(1,))
    out = model(inputs, targets)
    _check_losses(out)
    out["loss"].backward()
    model.clear_gradients()

    inputs, targets = _synthetic_batch(1, empty=(0,))
    out = model(inputs, targets)
    assert float(out["loss_ins"]) == 0.0 and float(out["loss_cate"]) > 0
    out["loss"].backward()
    # the zero dice term still reaches the kernel branch (every parameter gets a gradient)
    assert dict(model.named_parameters())["solov2_head.bbox_head.solo_kernel.weight"].grad is not None
    assert _grad_norm(model, "solov2_head.bbox_head.solo_cate.weight") > 0


def test_a_few_momentum_steps_overfit_one_batch():
    model = _slim_model()
    inputs, targets = _synthetic_batch(2)
    opt = paddle.optimizer.Momentum(learning_rate=0.003, momentum=0.9, parameters=model.parameters())
    history = train_steps(model, inputs, targets, opt, 12)
    first, last = history[0], history[-1]
    assert all(math.isfinite(h["loss"]) for h in history)
    assert last["loss"] < 0.7 * first["loss"], [round(h["loss"], 3) for h in history]
    assert last["loss_ins"] < first["loss_ins"] and last["loss_cate"] < first["loss_cate"]
