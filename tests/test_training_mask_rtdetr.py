"""Mask-RT-DETR training: matcher, losses, denoising groups, the training forward, a few real steps.

Unit tests check the pieces against direct numpy computations on small hand-built inputs; a tiny
``MaskRTDETRTransformer`` on random features covers the training forward (including images and
batches without objects); the last test trains Mask-RT-DETR-S for a few AdamW steps on two
COCO images at 320x320 (skipped without ``shared/data/coco_tiny_val2017``). Eval-mode parity is
the oracle tests' job (tests/test_modeling_mask_rtdetr.py).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from instseg_core.modeling.losses.denoising import build_denoising_group, denoising_attn_mask
from instseg_core.modeling.losses.detr_loss import (MaskDINOLoss, dice_loss, mask_iou, sigmoid_focal_loss,
                                                     varifocal_loss)
from instseg_core.modeling.losses.hungarian_matcher import HungarianMatcher
from instseg_core.modeling.losses.point_sample import point_sample, uncertain_points

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny_val2017"


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _xyxy(b):
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def _giou(a, b):
    """Pairwise GIoU of xyxy boxes a [N,4], b [M,4]."""
    a, b = a[:, None], b[None]
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a) + area(b) - inter
    hull = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
    hull = hull[..., 0] * hull[..., 1]
    return inter / union - (hull - union) / hull


# ---------------------------------------------------------------- element-wise losses
def test_dice_focal_varifocal_match_numpy():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 50).astype(np.float32) * 3
    t = (rng.rand(3, 50) > 0.6).astype(np.float32)
    s = _sigmoid(x)

    exp_dice = 1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)
    np.testing.assert_allclose(dice_loss(paddle.to_tensor(x), paddle.to_tensor(t)).numpy(), exp_dice, rtol=1e-5)

    p_t = s * t + (1 - s) * (1 - t)
    a_t = 0.25 * t + 0.75 * (1 - t)
    exp_focal = a_t * (1 - p_t) ** 2 * _bce(x, t)
    np.testing.assert_allclose(sigmoid_focal_loss(paddle.to_tensor(x), paddle.to_tensor(t)).numpy(),
                               exp_focal, rtol=1e-4, atol=1e-7)

    score = t * rng.rand(3, 50).astype(np.float32)  # IoU-like targets on the positives
    exp_vfl = _bce(x, score) * (0.75 * s ** 2 * (1 - t) + score * t)
    got = varifocal_loss(paddle.to_tensor(x), paddle.to_tensor(score), paddle.to_tensor(t)).numpy()
    np.testing.assert_allclose(got, exp_vfl, rtol=1e-4, atol=1e-7)


def test_mask_iou_of_identical_and_disjoint_masks():
    gt = np.zeros([2, 16, 16], np.float32)
    gt[0, 2:10, 2:10] = 1
    gt[1, 0:4, 0:4] = 1
    logits = np.where(gt[:, ::2, ::2] > 0, 10.0, -10.0).astype(np.float32)  # half resolution
    logits[1] = -10.0  # predicts nothing
    iou = mask_iou(paddle.to_tensor(logits), paddle.to_tensor(gt)).numpy()
    assert iou[0] == pytest.approx(1.0, abs=0.05) and iou[1] < 0.01


# ---------------------------------------------------------------- point sampling
def test_point_sample_reads_pixel_centres_and_uncertain_points_shape():
    rng = np.random.RandomState(1)
    maps = rng.randn(2, 5, 7).astype(np.float32)
    ys, xs = np.array([0, 2, 4, 3]), np.array([0, 6, 3, 1])
    pts = np.stack([(xs + 0.5) / 7, (ys + 0.5) / 5], -1).astype(np.float32)  # exact centres
    got = point_sample(paddle.to_tensor(maps), paddle.to_tensor(pts)).numpy()
    np.testing.assert_allclose(got, maps[:, ys, xs], rtol=1e-5, atol=1e-6)

    pts = uncertain_points(paddle.to_tensor(maps), 40, 3.0, 0.75).numpy()
    assert pts.shape == (2, 40, 2) and pts.min() >= 0 and pts.max() <= 1


# ---------------------------------------------------------------- matcher
def _hand_built_case():
    """3 queries, image 0 with 2 objects (query 2 <-> object 0, query 0 <-> object 1), image 1 empty."""
    q, c, h = 3, 4, 8
    logits = np.full([2, q, c], -6.0, np.float32)
    logits[0, 2, 1] = 6.0  # query 2 says class 1
    logits[0, 0, 3] = 6.0  # query 0 says class 3
    boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), [2, q, 1])
    boxes[0, 2] = [0.25, 0.25, 0.3, 0.3]
    boxes[0, 0] = [0.7, 0.7, 0.4, 0.4]
    gt_boxes = np.array([[0.26, 0.24, 0.3, 0.32], [0.7, 0.72, 0.38, 0.4]], np.float32)
    gt_masks = np.zeros([2, 2 * h, 2 * h], np.float32)  # ground truth at twice the mask resolution
    for j, (x1, y1, x2, y2) in enumerate(_xyxy(gt_boxes) * 2 * h):
        gt_masks[j, int(y1):int(y2), int(x1):int(x2)] = 1
    masks = np.full([2, q, h, h], -5.0, np.float32)
    masks[0, 2] = np.where(gt_masks[0, ::2, ::2] > 0, 5.0, -5.0)
    masks[0, 0] = np.where(gt_masks[1, ::2, ::2] > 0, 5.0, -5.0)
    targets = [{"labels": paddle.to_tensor(np.array([1, 3], np.int64)), "boxes": paddle.to_tensor(gt_boxes),
                "masks": paddle.to_tensor(gt_masks)},
               {"labels": paddle.zeros([0], "int64"), "boxes": paddle.zeros([0, 4]),
                "masks": paddle.zeros([0, 2 * h, 2 * h])}]
    return logits, boxes, masks, targets


def test_matcher_recovers_obvious_assignment_and_handles_empty_image():
    logits, boxes, masks, targets = _hand_built_case()
    match = HungarianMatcher()(paddle.to_tensor(logits), paddle.to_tensor(boxes), paddle.to_tensor(masks), targets)
    q, j = match[0]
    assert dict(zip(q.tolist(), j.tolist())) == {2: 0, 0: 1}
    assert match[1][0].shape == (0,) and match[1][1].shape == (0,)
    # without masks the class + box costs alone give the same answer
    q, j = HungarianMatcher()(paddle.to_tensor(logits), paddle.to_tensor(boxes), None, targets)[0]
    assert dict(zip(q.tolist(), j.tolist())) == {2: 0, 0: 1}


def test_matcher_cost_matrix_matches_numpy():
    logits, boxes, masks, targets = _hand_built_case()
    logits = logits + np.random.RandomState(2).randn(*logits.shape).astype(np.float32)
    m = HungarianMatcher()
    t = targets[0]
    got = m.cost_matrix(paddle.to_tensor(logits[0]), paddle.to_tensor(boxes[0]), paddle.to_tensor(masks[0]), t).numpy()

    labels, gtb, gtm = t["labels"].numpy(), t["boxes"].numpy(), t["masks"].numpy()
    p = _sigmoid(logits[0])[:, labels]
    cls = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p ** 2 * -np.log(1 - p + 1e-8)
    l1 = np.abs(boxes[0][:, None] - gtb[None]).sum(-1)
    giou = _giou(_xyxy(boxes[0]), _xyxy(gtb))
    x = masks[0].reshape(3, -1)
    cov = gtm.reshape(2, 8, 2, 8, 2).mean((2, 4)).reshape(2, -1)  # area average onto the 8x8 grid
    bce = np.stack([_bce(x, c[None]).mean(-1) for c in cov], 1)
    s = _sigmoid(x)
    dice = 1 - (2 * s @ cov.T + 1) / (s.sum(-1)[:, None] + cov.sum(-1)[None] + 1)
    exp = 4 * cls + 5 * l1 - 2 * giou + 5 * bce + 5 * dice
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- denoising
def _gt(n_per_image, seed=0):
    rng = np.random.RandomState(seed)
    labels, boxes = [], []
    for n in n_per_image:
        labels.append(paddle.to_tensor(rng.randint(0, 5, n).astype(np.int64)))
        cxcy = 0.3 + 0.4 * rng.rand(n, 2)
        wh = 0.05 + 0.1 * rng.rand(n, 2)  # small boxes away from the border: no clipping
        boxes.append(paddle.to_tensor(np.concatenate([cxcy, wh], -1).astype(np.float32)))
    return labels, boxes


def test_denoising_attn_mask_blocks():
    m = denoising_attn_mask(num_denoising=6, group_size=3, num_queries=4)
    assert m.shape == (10, 10)
    assert not m[6:, :6].any() and m[6:, 6:].all()  # matching part sees only itself
    assert m[:3, :3].all() and m[3:6, 3:6].all()  # a group sees itself ...
    assert not m[:3, 3:6].any() and not m[3:6, :3].any()  # ... not the other group
    assert m[:6, 6:].all()  # ... and the matching queries


@pytest.mark.parametrize("contrastive", [False, True])
def test_denoising_group_layout(contrastive):
    paddle.seed(0)
    labels, boxes = _gt([3, 0, 2])
    embed = paddle.randn([5, 8])
    g = build_denoising_group(labels, boxes, embed, num_queries=7, num_denoising=10,
                              label_noise_ratio=0.0, box_noise_scale=0.0, contrastive=contrastive)
    per_group = 6 if contrastive else 3
    assert (g.max_gt, g.num_groups, g.group_size) == (3, 3, per_group)
    nd = 3 * per_group
    assert tuple(g.queries.shape) == (3, nd, 8) and tuple(g.ref_boxes.shape) == (3, nd, 4)
    assert tuple(g.attn_mask.shape) == (nd + 7, nd + 7) and g.attn_mask.dtype == paddle.bool
    np.testing.assert_array_equal(g.attn_mask.numpy(), denoising_attn_mask(nd, per_group, 7))
    q = g.queries.numpy()
    # without noise: slot j of every block is object j's label embedding and box; padding is zero
    for start in range(0, nd, 3):
        np.testing.assert_allclose(q[0, start:start + 3], embed.numpy()[labels[0].numpy()])
        np.testing.assert_allclose(g.ref_boxes.numpy()[0, start:start + 3], boxes[0].numpy())
        assert not q[1, start:start + 3].any() and not q[2, start + 2].any()
    # known assignment: positives only (first half of a contrastive group)
    qi, gi = g.match_indices()[0]
    starts = np.arange(3) * per_group
    np.testing.assert_array_equal(qi, (starts[:, None] + np.arange(3)).ravel())
    np.testing.assert_array_equal(gi, np.tile(np.arange(3), 3))
    assert g.match_indices()[1][0].size == 0
    assert build_denoising_group([paddle.zeros([0], "int64")], [paddle.zeros([0, 4])], embed, 7) is None


def test_contrastive_noise_positive_inside_negative_outside():
    paddle.seed(3)
    labels, boxes = _gt([4, 2], seed=1)
    g = build_denoising_group(labels, boxes, paddle.randn([5, 8]), num_queries=5, num_denoising=40,
                              label_noise_ratio=0.0, box_noise_scale=1.0, contrastive=True)
    gt = boxes[0].numpy()
    half = np.concatenate([gt[:, 2:], gt[:, 2:]], -1) * 0.5  # the noise unit of each corner
    ref = g.ref_boxes.numpy()[0]
    for grp in range(g.num_groups):
        s = grp * g.group_size
        pos = np.abs(_xyxy(ref[s:s + 4]) - _xyxy(gt)) / half
        neg = np.abs(_xyxy(ref[s + 4:s + 8]) - _xyxy(gt)) / half
        assert pos.max() < 1 + 1e-4 and neg.min() > 1 - 1e-4 and neg.max() < 2 + 1e-4


def test_plain_noise_bounds_and_label_flips():
    paddle.seed(4)
    labels, boxes = _gt([5], seed=2)
    g = build_denoising_group(labels, boxes, paddle.randn([5, 8]), num_queries=5, num_denoising=100,
                              label_noise_ratio=0.0, box_noise_scale=1.0)
    gt = np.tile(boxes[0].numpy(), [g.num_groups, 1])
    unit = np.concatenate([gt[:, 2:] * 0.5, gt[:, 2:]], -1)
    d = np.abs(g.ref_boxes.numpy()[0] - gt) / unit
    assert d.max() <= 1 + 1e-5 and d.mean() > 0.3  # U(-1, 1) * (w/2, h/2, w, h)
    # label noise 1.0 flips about half of the labels (a flip may land on the true class)
    embed = paddle.randn([5, 8])
    g = build_denoising_group(labels, boxes, embed, num_queries=5, num_denoising=1000,
                              label_noise_ratio=1.0, box_noise_scale=0.0)
    true = np.tile(embed.numpy()[labels[0].numpy()], [g.num_groups, 1])
    changed = np.abs(g.queries.numpy()[0] - true).max(-1) > 0
    assert 0.25 < changed.mean() < 0.55


def test_attention_mask_isolates_matching_queries():
    from instseg_core.modeling.necks.mask_hybrid_encoder import _MultiHeadSelfAttention

    paddle.seed(5)
    attn = _MultiHeadSelfAttention(16, 4)
    mask = paddle.to_tensor(denoising_attn_mask(4, 2, 3))
    x = paddle.randn([1, 7, 16])
    y = x.clone()
    y[:, :4] = paddle.randn([1, 4, 16])  # other denoising queries
    a, b = attn(x, x, x, mask).numpy(), attn(y, y, y, mask).numpy()
    np.testing.assert_allclose(a[:, 4:], b[:, 4:], rtol=1e-5, atol=1e-6)
    assert np.abs(a[:, :4] - b[:, :4]).max() > 1e-3
    np.testing.assert_allclose(attn(x, x, x).numpy(), attn(x, x, x, paddle.ones([7, 7], "bool")).numpy(),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training forward, tiny transformer
def _tiny_transformer_case(n_per_image):
    from instseg_core.modeling.heads.mask_rtdetr import MaskRTDETRTransformer

    paddle.seed(6)
    tr = MaskRTDETRTransformer(in_channels=16, hidden_dim=32, num_classes=5, num_queries=12,
                               num_heads=4, num_decoder_layers=2, dim_feedforward=64, num_prototypes=8,
                               num_denoising=20)
    b = len(n_per_image)
    feats = [paddle.randn([b, 16, s, s]) for s in (8, 4, 2)]
    mask_feat = paddle.randn([b, 8, 16, 16])
    labels, boxes = _gt(n_per_image, seed=7)
    targets = []
    for lab, box in zip(labels, boxes):
        m = np.zeros([len(lab.numpy()), 64, 64], np.float32)
        for k, (x1, y1, x2, y2) in enumerate(_xyxy(box.numpy()) * 64):
            m[k, int(y1):int(math.ceil(y2)), int(x1):int(math.ceil(x2))] = 1
        targets.append({"labels": lab, "boxes": box, "masks": paddle.to_tensor(m)})
    return tr, feats, mask_feat, targets


@pytest.mark.parametrize("n_per_image", [[3, 0], [0, 0]])
def test_tiny_training_forward_and_losses(n_per_image):
    tr, feats, mask_feat, targets = _tiny_transformer_case(n_per_image)
    tr.train()
    out = tr(feats, mask_feat, targets)
    assert len(out.predictions) == 1 + 1 + 2  # encoder top-k, decoder input, 2 layers
    for p in out.predictions:
        assert tuple(p.logits.shape) == (2, 12, 5) and tuple(p.boxes.shape) == (2, 12, 4)
        assert tuple(p.masks.shape) == (2, 12, 16, 16)
    if max(n_per_image) == 0:
        assert out.dn_group is None and out.dn_predictions is None
    else:
        nd = out.dn_group.num_queries
        assert nd == 3 * (20 // 3) and len(out.dn_predictions) == 3
        assert all(tuple(p.logits.shape) == (2, nd, 5) for p in out.dn_predictions)

    # the encoder's class predictions train the encoder (the query selection), the decoder input does not
    enc_w = tr.enc_output[0].weight
    (g,) = paddle.grad(out.predictions[0].logits.sum(), enc_w, retain_graph=True)
    assert float(g.abs().sum()) > 0
    (g,) = paddle.grad(out.predictions[1].logits.sum(), enc_w, retain_graph=True, allow_unused=True)
    assert g is None or float(g.abs().sum()) == 0

    losses = MaskDINOLoss(5, num_points=256)(out.predictions, targets, out.dn_predictions, out.dn_group)
    assert len(losses) == 21 and all(v.shape == [] for v in losses.values())
    assert all(np.isfinite(float(v)) for v in losses.values())
    terms = sum(float(v) for k, v in losses.items() if k != "loss")
    assert float(losses["loss"]) == pytest.approx(terms, rel=1e-5)
    if max(n_per_image) == 0:
        assert float(losses["loss_bbox"]) == 0 and float(losses["loss_class_dn"]) == 0
        assert float(losses["loss_class"]) > 0  # every query is pushed towards background
    losses["loss"].backward()
    assert tr.score_head.weight.grad is not None
    if max(n_per_image) > 0:  # the label embedding is trained through the denoising queries
        assert float(tr.denoising_class_embed.weight.grad.abs().sum()) > 0


def test_tiny_eval_forward_ignores_targets_and_denoising():
    tr, feats, mask_feat, targets = _tiny_transformer_case([3, 1])
    tr.eval()
    with paddle.no_grad():
        a = tr(feats, mask_feat)
        b = tr(feats, mask_feat, targets)
    assert len(a) == 4 and tuple(a[0].shape) == (1, 2, 12, 5)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_model_training_needs_targets():
    from instseg_core.modeling import build_model

    model = build_model("Mask-RT-DETR-S")
    model.train()
    with pytest.raises(ValueError, match="targets"):
        model({"image": paddle.zeros([1, 3, 64, 64])})
    assert "criterion" not in dict(model.named_sublayers())


# ---------------------------------------------------------------- real data, Mask-RT-DETR-S
def test_mask_rtdetr_s_trains_on_two_coco_images():
    ann = COCO / "annotations" / "instances_val2017_mini8.json"
    if not ann.exists():
        pytest.skip(f"{ann} not available")
    from instseg_core.modeling import build_model
    from instseg_core.training.data import CocoInstanceDataset, load_batch

    t0 = time.time()
    paddle.seed(0)
    dataset = CocoInstanceDataset(ann, COCO / "val2017")
    inputs, targets = load_batch(dataset, [0, 1], size=320)
    assert tuple(inputs["image"].shape) == (2, 3, 320, 320)
    model = build_model("Mask-RT-DETR-S")
    model.train()
    # fewer mask points than the reference 12544 (per matched mask): same loss, cheaper on CPU
    model.criterion.num_points = 3136
    opt = paddle.optimizer.AdamW(learning_rate=2e-4, parameters=model.parameters(), weight_decay=1e-4)
    backbone_param = model.backbone.stages[0].blocks[0].layers[0].conv.weight
    history, steps = [], 4
    for step in range(steps + 1):  # the last pass only measures the loss after `steps` updates
        if step == steps:
            with paddle.no_grad():
                losses = model(inputs, targets)
        else:
            losses = model(inputs, targets)
        assert all(np.isfinite(float(v)) for v in losses.values()), losses
        history.append(float(losses["loss"]))
        if step == steps:
            break
        losses["loss"].backward()
        if step == 0:
            assert backbone_param.grad is not None and float(backbone_param.grad.abs().sum()) > 0
            assert model.backbone.stem.stem1.conv.weight.grad is None  # the stem is frozen
        opt.step()
        opt.clear_grad()
    print("Mask-RT-DETR-S losses:", [round(v, 2) for v in history], f"({time.time() - t0:.0f}s)")
    assert history[-1] < 0.85 * history[0], history
