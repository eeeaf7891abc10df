"""Mask R-CNN / Cascade Mask R-CNN training: target assignment on hand-made boxes, the losses
against hand computations, the builders' training settings, and real steps on synthetic images.

The real-step tests use small images (96 x 128) and, except the reference-settings step, fewer
sampled RoIs than the reference (the mask head costs ~0.5 GMAC per foreground RoI on a CPU).
A randomly initialised ResNet whose BatchNorm is frozen at identity statistics produces huge
activations; :func:`_calibrate_bn` gives its frozen BN layers the statistics of the batch, so
that the features have the unit scale a pretrained backbone gives.
"""
from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import paddle
import pytest

from instseg_core.modeling.heads.roi_heads import delta2bbox
from instseg_core.modeling.losses.rcnn_loss import box_head_loss, mask_loss, rpn_loss
from instseg_core.modeling.losses.rcnn_targets import (AnchorTargets, RoITargets, assign_anchors,
                                                       encode_deltas, mask_targets, match_boxes,
                                                       sample_rois, subsample_labels)
from training_utils import train_steps

H, W = 96, 128


def _t(x, dtype="float32"):
    return paddle.to_tensor(np.asarray(x, dtype=dtype))


# --------------------------------------------------------------------------------- target assignment
def test_match_boxes_thresholds_and_low_quality_matches():
    # 2 GT x 5 boxes
    iou = _t([[0.80, 0.50, 0.20, 0.00, 0.10],
              [0.10, 0.60, 0.25, 0.35, 0.00]])
    matches, labels = match_boxes(iou, 0.7, 0.3, allow_low_quality=False)
    assert matches.numpy().tolist() == [0, 1, 1, 1, 0]
    assert labels.numpy().tolist() == [1, -1, 0, -1, 0]
    # GT 1's best box (0.60, box 1) becomes positive; GT 0's best is already positive
    _, labels = match_boxes(iou, 0.7, 0.3, allow_low_quality=True)
    assert labels.numpy().tolist() == [1, 1, 0, -1, 0]


def test_subsample_labels_counts_and_fraction():
    paddle.seed(1)
    labels = _t([1] * 40 + [0] * 100 + [-1] * 10, "int32")
    fg, bg = subsample_labels(labels, 64, 0.5, bg_label=0)
    assert len(fg) == 32 and len(bg) == 32
    assert (fg.numpy() < 40).all() and ((bg.numpy() >= 40) & (bg.numpy() < 140)).all()
    assert len(set(fg.numpy().tolist())) == 32 and len(set(bg.numpy().tolist())) == 32
    # few positives: the negatives fill the batch
    fg, bg = subsample_labels(_t([1] * 5 + [0] * 100, "int32"), 64, 0.5, bg_label=0)
    assert len(fg) == 5 and len(bg) == 59


def _grid_anchors(step=8, size=32, extent=128):
    c = np.arange(0, extent, step, dtype=np.float32)
    cx, cy = np.meshgrid(c, c)
    cx, cy = cx.ravel(), cy.ravel()
    return np.stack([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], 1)


def test_assign_anchors_labels_counts_and_deltas():
    paddle.seed(0)
    anchors = _grid_anchors()  # 256 anchors of 32 x 32 every 8 px
    gt = np.array([[24, 24, 56, 56], [70, 80, 110, 100]], np.float32)
    t = assign_anchors(_t(anchors), _t(gt), batch_size_per_im=64, fg_fraction=0.5)
    labels = t.labels.numpy()
    iou = _np_iou(gt, anchors)
    best = iou.max(0)
    # sampled: 64 in all, every positive is a >= 0.7 match or a GT's best anchor, negatives < 0.3
    assert (labels >= 0).sum() == 64
    pos, neg = labels == 1, labels == 0
    assert 0 < pos.sum() <= 32
    low_quality = (iou == iou.max(1, keepdims=True)).any(0)
    assert ((best[pos] >= 0.7) | low_quality[pos]).all()
    assert (best[neg] < 0.3).all()
    assert pos[np.argmax(iou[1])]  # GT 1 (40 x 20) matches no anchor at 0.7: its best one is positive
    # the deltas of the positives decode back onto their GT (unit weights)
    decoded = delta2bbox(t.deltas, _t(anchors), (1.0, 1.0, 1.0, 1.0))[:, 0].numpy()
    matched = gt[iou.argmax(0)]
    np.testing.assert_allclose(decoded[pos], matched[pos], atol=1e-3)


def test_assign_anchors_without_gt_samples_background_only():
    t = assign_anchors(_t(_grid_anchors()), paddle.zeros([0, 4]), batch_size_per_im=64)
    labels = t.labels.numpy()
    assert (labels == 0).sum() == 64 and (labels == 1).sum() == 0
    assert float(t.deltas.abs().sum()) == 0.0


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (30.0, 30.0, 15.0, 15.0)])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, (20, 2))], 1).astype(np.float32)
    xy = rng.uniform(0, 100, (20, 2))
    targets = np.concatenate([xy, xy + rng.uniform(4, 60, (20, 2))], 1).astype(np.float32)
    deltas = encode_deltas(_t(boxes), _t(targets), weights)
    np.testing.assert_allclose(delta2bbox(deltas, _t(boxes), weights)[:, 0].numpy(), targets, atol=1e-3)
    # identical boxes: zero deltas; a shift of half the width: dx = wx / 2
    d = encode_deltas(_t([[0, 0, 10, 20]]), _t([[5, 0, 15, 20]]), weights).numpy()[0]
    np.testing.assert_allclose(d, [weights[0] / 2, 0, 0, 0], atol=1e-6)


def test_sample_rois_fraction_labels_and_gt_proposals():
    paddle.seed(0)
    gt = np.array([[10, 10, 50, 50], [60, 20, 120, 80]], np.float32)
    rng = np.random.default_rng(1)
    # 300 jittered copies of the GT boxes (mostly foreground) and 700 random boxes (background)
    jitter = np.repeat(gt, 150, 0) + rng.uniform(-4, 4, (300, 4)).astype(np.float32)
    xy = rng.uniform(0, 200, (700, 2))
    rand = np.concatenate([xy, xy + rng.uniform(5, 30, (700, 2))], 1).astype(np.float32)
    props = np.concatenate([jitter, rand])
    t = sample_rois(_t(props), _t(gt), _t([2, 0], "int64"), num_classes=3, batch_size_per_im=128,
                    fg_fraction=0.25)
    labels, rois, gt_idx = t.labels.numpy(), t.rois.numpy(), t.gt_index.numpy()
    assert len(labels) == 128
    fg = labels < 3
    assert fg.sum() == 32 and (labels[~fg] == 3).all()  # background is the last class index
    assert fg[:32].all()  # foreground first
    iou = _np_iou(gt, rois)
    assert (iou.max(0)[fg] >= 0.5).all() and (iou.max(0)[~fg] < 0.5).all()
    np.testing.assert_array_equal(labels[fg], np.array([2, 0])[gt_idx[fg]])
    np.testing.assert_allclose(t.gt_boxes.numpy()[fg], gt[gt_idx[fg]])
    # the GT boxes are candidates: with few proposals they are always among the foreground
    t = sample_rois(_t(rand[:50]), _t(gt), _t([2, 0], "int64"), num_classes=3, batch_size_per_im=128)
    fg_rois = t.rois.numpy()[t.labels.numpy() < 3]
    assert any(np.allclose(r, gt[0]) for r in fg_rois) and any(np.allclose(r, gt[1]) for r in fg_rois)
    assert len(t.labels) == 52  # everything: fewer candidates than the batch size


def test_sample_rois_without_gt_and_cascade_relabelling():
    props = _t([[0, 0, 10, 10], [5, 5, 30, 30], [40, 40, 60, 70]])
    t = sample_rois(props, paddle.zeros([0, 4]), paddle.zeros([0], "int64"), num_classes=2)
    assert t.labels.numpy().tolist() == [2, 2, 2] and float(t.gt_boxes.abs().sum()) == 0.0
    # cascade stages: all boxes, in order, labelled at the stage's IoU threshold, no GT added
    gt = _t([[0, 0, 10, 10]])
    boxes = _t([[0, 0, 10, 10], [0, 0, 10, 13], [0, 0, 10, 16]])  # IoU 1, 0.77, 0.625
    for thresh, expected in ((0.6, [1, 1, 1]), (0.7, [1, 1, 2])):
        t = sample_rois(boxes, gt, _t([1], "int64"), num_classes=2, fg_thresh=thresh, bg_thresh=thresh,
                        add_gt_as_proposals=False, subsample=False)
        assert t.labels.numpy().tolist() == expected
        np.testing.assert_array_equal(t.rois.numpy(), boxes.numpy())


def test_mask_targets_of_known_masks():
    masks = np.zeros((2, 64, 64), np.float32)
    masks[0, 8:40, 16:48] = 1  # a 32 x 32 square
    masks[1, 32:64, 0:32] = 1
    rois = _t([[16, 8, 48, 40],    # exactly GT 0's square -> all ones
               [0, 32, 64, 64],    # GT 1: left half ones
               [16, 8, 80, 40]])   # GT 0, twice as wide -> left half ones
    out = mask_targets(_t(masks), rois, _t([0, 1, 0], "int64"), resolution=28).numpy()
    assert out.shape == (3, 28, 28)
    assert (out[0] == 1).all()
    half = np.zeros((28, 28), np.float32)
    half[:, :14] = 1
    np.testing.assert_array_equal(out[1], half)
    np.testing.assert_array_equal(out[2], half)
    assert mask_targets(_t(masks), paddle.zeros([0, 4]), paddle.zeros([0], "int64")).shape == [0, 28, 28]


# -------------------------------------------------------------------------------------------- losses
def test_rpn_loss_normalised_by_sampled_anchor_budget():
    logits = np.array([[2.0, -1.0, 0.5, 0.0]], np.float32)
    deltas = np.zeros((1, 4, 4), np.float32)
    deltas[0, 0] = [0.1, -0.2, 0.3, 0.0]
    target = AnchorTargets(labels=_t([1, 0, -1, 0], "int32"), deltas=_t(np.tile([[0.0, 0.0, 0.5, 0.5]], (4, 1))))
    out = rpn_loss(_t(logits), _t(deltas), [target], batch_size_per_im=256)
    bce = lambda x, y: max(x, 0) - x * y + math.log1p(math.exp(-abs(x)))  # noqa: E731
    assert float(out["loss_rpn_cls"]) == pytest.approx((bce(2.0, 1) + bce(-1.0, 0) + bce(0.0, 0)) / 256, rel=1e-5)
    assert float(out["loss_rpn_reg"]) == pytest.approx((0.1 + 0.2 + 0.2 + 0.5) / 256, rel=1e-5)


def test_box_head_loss_class_specific_and_agnostic():
    rng = np.random.default_rng(0)
    rois = np.array([[0, 0, 10, 10], [5, 5, 25, 15], [0, 0, 30, 30]], np.float32)
    gt = np.array([[1, 1, 11, 12], [4, 6, 24, 17], [0, 0, 0, 0]], np.float32)
    labels = np.array([1, 0, 2])  # 2 classes: RoI 2 is background
    target = RoITargets(rois=_t(rois), labels=_t(labels, "int64"), gt_index=_t([0, 1, 0], "int64"),
                        gt_boxes=_t(gt))
    logits = rng.normal(size=(3, 3)).astype(np.float32)
    deltas = rng.normal(size=(3, 8)).astype(np.float32)
    out = box_head_loss(_t(logits), _t(deltas), [target], num_classes=2, weights=(10, 10, 5, 5))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert float(out["loss_bbox_cls"]) == pytest.approx(-logp[np.arange(3), labels].mean(), rel=1e-5)
    enc = encode_deltas(_t(rois[:2]), _t(gt[:2]), (10, 10, 5, 5)).numpy()
    picked = np.stack([deltas[0, 4:8], deltas[1, 0:4]])  # the GT class's columns
    assert float(out["loss_bbox_reg"]) == pytest.approx(np.abs(picked - enc).sum() / 3, rel=1e-5)
    agnostic = box_head_loss(_t(logits), _t(deltas[:, :4]), [target], num_classes=2, weights=(10, 10, 5, 5))
    assert float(agnostic["loss_bbox_reg"]) == pytest.approx(np.abs(deltas[:2, :4] - enc).sum() / 3, rel=1e-5)
    # no foreground: zero, still differentiable
    bg = RoITargets(rois=_t(rois), labels=_t([2, 2, 2], "int64"), gt_index=_t([0, 0, 0], "int64"), gt_boxes=_t(gt))
    d = _t(deltas)
    d.stop_gradient = False
    out = box_head_loss(_t(logits), d, [bg], num_classes=2, weights=(10, 10, 5, 5))
    out["loss_bbox_reg"].backward()
    assert float(out["loss_bbox_reg"]) == 0.0 and d.grad is not None


def test_mask_loss_uses_the_gt_class_channel():
    logits = np.zeros((2, 3, 2, 2), np.float32)
    logits[0, 1] = 5.0   # RoI 0 (class 1): confident and right
    logits[1, 2] = -5.0  # RoI 1 (class 2): confident and wrong
    targets = np.ones((2, 2, 2), np.float32)
    loss = float(mask_loss(_t(logits), _t([1, 2], "int64"), _t(targets)))
    assert loss == pytest.approx((math.log1p(math.exp(-5)) + math.log1p(math.exp(5))) / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------- builders
def test_builders_training_settings_and_frozen_stages():
    from instseg_core.modeling.mask_rcnn import mask_rcnn

    fpn = mask_rcnn("MaskRCNN-ResNet50-FPN", num_classes=3)
    cfg = fpn.train_cfg
    assert (cfg.rpn_batch_size_per_im, cfg.rpn_fg_fraction, cfg.rpn_positive_overlap, cfg.rpn_negative_overlap) \
        == (256, 0.5, 0.7, 0.3)
    assert (cfg.roi_batch_size_per_im, cfg.roi_fg_fraction, cfg.roi_fg_thresh, cfg.roi_bg_thresh) == (512, 0.25, 0.5, 0.5)
    assert cfg.mask_resolution == 28
    assert (cfg.train_pre_nms_top_n, cfg.train_post_nms_top_n, cfg.topk_after_collect) == (2000, 1000, True)
    assert (fpn.rpn_head.pre_nms_top_n, fpn.rpn_head.post_nms_top_n) == (1000, 1000)  # test settings unchanged
    backbone = fpn.backbone
    assert all(p.stop_gradient for p in backbone.conv1.parameters())
    assert all(p.stop_gradient for p in backbone.res2.parameters())
    assert not backbone.res3.res3a.branch2a.conv.weight.stop_gradient
    assert backbone.res3.res3a.branch2a.norm.weight.stop_gradient  # frozen BN everywhere
    assert not any(p.stop_gradient for p in fpn.neck.parameters())
    assert not any(p.stop_gradient for n, p in fpn.named_parameters() if n.startswith(("rpn_head", "bbox_head", "mask_head")))
    assert backbone.res5.res5a.branch2a.conv.weight.optimize_attr["learning_rate"] == 1.0

    c4 = mask_rcnn("MaskRCNN-ResNet50", num_classes=3)
    assert c4.train_cfg.mask_resolution == 14
    assert (c4.train_cfg.train_pre_nms_top_n, c4.train_cfg.train_post_nms_top_n, c4.train_cfg.topk_after_collect) \
        == (12000, 2000, False)
    assert not c4.bbox_head.head.res5.res5a.branch2a.conv.weight.stop_gradient  # the RoI head's res5 trains

    ssld = mask_rcnn("Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN", num_classes=3)
    assert ssld.train_cfg.train_post_nms_top_n == 2000
    assert ssld.train_cfg.cascade_iou == (0.5, 0.6, 0.7)
    assert ssld.bbox_head.bbox_weight == [[10, 10, 5, 5], [20, 20, 10, 10], [30, 30, 15, 15]]
    mults = [s.blocks[0].branch2a.conv.weight.optimize_attr["learning_rate"] for s in ssld.backbone.stages[1:]]
    assert mults == [0.05, 0.1, 0.15]


# --------------------------------------------------------------------------------------- real steps
def _instance(rng: np.random.Generator, k: int):
    """A filled ellipse (even k) or rectangle (odd k) of 18..40 px, fully inside the image."""
    m = np.zeros((H, W), np.uint8)
    cx, cy = int(rng.integers(24, W - 24)), int(rng.integers(24, H - 24))
    if k % 2 == 0:
        cv2.ellipse(m, (cx, cy), (int(rng.integers(9, 20)), int(rng.integers(9, 18))), 0, 0, 360, 1, -1)
    else:
        w, h = int(rng.integers(18, 40)), int(rng.integers(18, 36))
        m[cy - h // 2:cy + h // 2, cx - w // 2:cx + w // 2] = 1
    return m


def _batch(counts, seed=0, num_classes=2):
    """Synthetic images (noise + coloured shapes, one colour per class) with ``counts[i]`` instances."""
    rng = np.random.default_rng(seed)
    colours = [(230, 40, 40), (40, 40, 230), (40, 200, 40)]
    images, targets = [], []
    for n in counts:
        img = rng.normal(110, 20, (H, W, 3)).astype(np.float32)
        masks, boxes, labels = [], [], []
        for k in range(n):
            m = _instance(rng, k)
            label = k % num_classes
            img[m > 0] = colours[label]
            ys, xs = np.nonzero(m)
            masks.append(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(label)
        images.append(((img / 255.0 - 0.45) / 0.25).transpose(2, 0, 1))
        targets.append({"labels": _t(np.array(labels, np.int64), "int64"),
                        "boxes": _t(np.array(boxes, np.float32).reshape(-1, 4)),
                        "masks": _t(np.array(masks, np.float32).reshape(-1, H, W))})
    inputs = {"image": _t(np.stack(images)), "im_shape": _t([[H, W]] * len(counts)),
              "scale_factor": _t([[1.0, 1.0]] * len(counts))}
    return inputs, targets


def _calibrate_bn(model, image):
    """Set every frozen BatchNorm of the backbone to the statistics of its input on ``image``."""
    def hook(layer, inputs):
        mean = inputs[0].mean([0, 2, 3])
        layer._mean.set_value(mean)
        layer._variance.set_value(((inputs[0] - mean.reshape([1, -1, 1, 1])) ** 2).mean([0, 2, 3]))

    hooks = [layer.register_forward_pre_hook(hook) for layer in model.backbone.sublayers()
             if isinstance(layer, paddle.nn.BatchNorm2D)]
    with paddle.no_grad():
        model.backbone(image)
    for h in hooks:
        h.remove()


def _build(name, num_classes, image, seed=0, **train_overrides):
    from instseg_core.modeling.mask_rcnn import mask_rcnn

    paddle.seed(seed)
    model = mask_rcnn(name, num_classes=num_classes)
    _calibrate_bn(model, image)
    if train_overrides:
        model.train_cfg = replace(model.train_cfg, **train_overrides)
    model.train()
    return model


def _check_terms(losses, names):
    assert set(losses) == set(names) | {"loss"}
    for k, v in losses.items():
        assert v.shape == [] and math.isfinite(float(v)), (k, v)
    total = sum(float(v) for k, v in losses.items() if k != "loss")
    assert float(losses["loss"]) == pytest.approx(total, rel=1e-5)


RCNN_TERMS = ("loss_rpn_cls", "loss_rpn_reg", "loss_bbox_cls", "loss_bbox_reg", "loss_mask")


@pytest.fixture(scope="module")
def fpn_model():
    inputs, _ = _batch([3, 0], num_classes=3)
    return _build("MaskRCNN-ResNet50-FPN", 3, inputs["image"])


def test_training_step_reference_settings(fpn_model):
    """Reference sampling (256 anchors, 512 RoIs per image); image 2 has no instance."""
    model = fpn_model
    inputs, targets = _batch([3, 0], num_classes=3)
    losses = model(inputs, targets)
    _check_terms(losses, RCNN_TERMS)
    assert all(float(losses[k]) > 0 for k in RCNN_TERMS)
    losses["loss"].backward()
    named = dict(model.named_parameters())
    for name in ("rpn_head.rpn_feat.rpn_conv.weight", "rpn_head.rpn_rois_score.weight", "rpn_head.rpn_rois_delta.weight",
                 "bbox_head.head.fc6.weight", "bbox_head.bbox_score.weight", "bbox_head.bbox_delta.weight",
                 "mask_head.head.upsample.mask_inter_feat_1.weight", "mask_head.mask_fcn_logits.weight",
                 "neck.fpn_res2_sum.weight", "backbone.res3.res3a.branch2a.conv.weight",
                 "backbone.res5.res5c.branch2c.conv.weight"):
        grad = named[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert named["backbone.conv1.conv1.conv.weight"].grad is None
    assert named["backbone.res2.res2a.branch2a.conv.weight"].grad is None
    model.clear_gradients()


def test_training_batch_without_instances(fpn_model):
    inputs, targets = _batch([0, 0], seed=3, num_classes=3)
    losses = fpn_model(inputs, targets)
    _check_terms(losses, RCNN_TERMS)
    assert float(losses["loss_rpn_cls"]) > 0 and float(losses["loss_bbox_cls"]) > 0
    assert float(losses["loss_rpn_reg"]) == 0 and float(losses["loss_bbox_reg"]) == 0
    assert float(losses["loss_mask"]) == 0
    losses["loss"].backward()
    # the zero terms keep their heads in the graph (zero gradients, as data-parallel training needs)
    assert fpn_model.mask_head.mask_fcn_logits.weight.grad is not None
    fpn_model.clear_gradients()


def test_training_forward_checks_targets(fpn_model):
    inputs, targets = _batch([1])
    with pytest.raises(ValueError, match="targets"):
        fpn_model(inputs)
    targets[0]["labels"] = _t([3], "int64")  # the model has 3 classes
    with pytest.raises(ValueError, match="labels"):
        fpn_model(inputs, targets)


def test_overfit_one_batch_lowers_the_loss():
    """8 Momentum steps on one image: the total loss drops clearly. For speed the backbone is
    frozen entirely and at most 4 foreground RoIs are sampled (64 RoIs, fg fraction 1/16): the
    mask head costs ~1.4 GMAC per foreground RoI and step on a CPU."""
    inputs, targets = _batch([2], seed=0)
    model = _build("MaskRCNN-ResNet50-FPN", 2, inputs["image"], roi_batch_size_per_im=64, roi_fg_fraction=1 / 16)
    model.backbone.freeze_stages(3)
    opt = paddle.optimizer.Momentum(learning_rate=1e-3, momentum=0.9,
                                    parameters=[p for p in model.parameters() if not p.stop_gradient])
    history = train_steps(model, inputs, targets, opt, 8)
    first, last = history[0], history[-1]
    print("loss per step:", [round(h["loss"], 3) for h in history])
    assert all(math.isfinite(h["loss"]) for h in history)
    assert min(h["loss"] for h in history[-3:]) < 0.6 * first["loss"]
    assert last["loss_rpn_cls"] < first["loss_rpn_cls"] and last["loss_mask"] < first["loss_mask"]


def test_cascade_training_step():
    inputs, targets = _batch([2], seed=1)
    model = _build("Cascade-MaskRCNN-ResNet50-FPN", 2, inputs["image"], roi_batch_size_per_im=32)
    losses = model(inputs, targets)
    stage_terms = [f"loss_bbox_{t}_stage{s}" for s in range(3) for t in ("cls", "reg")]
    _check_terms(losses, ("loss_rpn_cls", "loss_rpn_reg", "loss_mask", *stage_terms))
    assert all(float(losses[k]) > 0 for k in stage_terms)  # the GT boxes keep foreground at IoU 0.7
    losses["loss"].backward()
    for s in range(3):
        for layer in (model.bbox_head.bbox_score_list[s], model.bbox_head.bbox_delta_list[s]):
            assert float(layer.weight.grad.abs().sum()) > 0
    opt = paddle.optimizer.Momentum(learning_rate=1e-3, momentum=0.9,
                                    parameters=[p for p in model.parameters() if not p.stop_gradient])
    opt.step()
    opt.clear_grad()
    assert math.isfinite(float(model(inputs, targets)["loss"]))


def test_c4_training_step():
    """The C4 model: RoIs through the box head's res5, the mask head on those features (14 x 14)."""
    inputs, targets = _batch([2], seed=2)
    model = _build("MaskRCNN-ResNet50", 2, inputs["image"], roi_batch_size_per_im=8)
    losses = model(inputs, targets)
    _check_terms(losses, RCNN_TERMS)
    assert float(losses["loss_mask"]) > 0
    losses["loss"].backward()
    for p in (model.bbox_head.head.res5.res5a.branch2a.conv.weight, model.mask_head.head.upsample.conv5_mask.weight,
              model.mask_head.mask_fcn_logits.weight, model.rpn_head.rpn_rois_score.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def _np_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [len(a), len(b)] of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)
