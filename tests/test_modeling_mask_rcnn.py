"""Mask R-CNN / Cascade Mask R-CNN (8 models) against the reference oracles.

For each model: state-dict names and shapes equal ``state_dict.tsv``; with the oracle weights
(``weights_rule.py``) and input, the backbone/FPN features, the RPN proposals (as a set: at
least 99% of them paired), the box-head deltas and scores (rows paired with the proposals), the
cascade's refined RoIs, the final detections (matched as sets; a row may flip only at a decision
boundary or where a proposal differs), the masks and the pre-paste mask probabilities agree with
``expected.npz`` within the tolerances of ``shared/oracles/README.md``. Skips cleanly when the
oracles are absent. The C4 model (``MaskRCNN-ResNet50``) is slow on CPU (1000 RoIs through res5).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from oracle_utils import (detection_misses, feature_error, match_rows, nearest_rows, oracle_available, oracle_dir,
                          paired_feature_error, require_oracle, state_shapes, weights_rule)

MODELS = ("MaskRCNN-ResNet50-FPN", "MaskRCNN-ResNet50-vd-FPN", "MaskRCNN-ResNet101-FPN",
          "MaskRCNN-ResNet101-vd-FPN", "MaskRCNN-ResNeXt101-vd-FPN", "Cascade-MaskRCNN-ResNet50-FPN",
          "Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN", "MaskRCNN-ResNet50")

REL_TOL = 2e-3      # features: max|got-exp| <= REL_TOL * std(exp)
PROB_TOL = 1e-3     # softmax scores / mask probabilities, absolute
ROI_TOL = 0.05      # proposals, px
SCORE_TOL = 1e-3
BOX_TOL = 1.0       # px, original image
MIN_PAIRED = 0.99   # of the expected proposals paired with a predicted one (near-ties may swap a few)
MAX_MISSES = 2      # unmatched detections per side, at decision boundaries (README rule 2)

_RUNS: dict = {}


def _run(name: str) -> dict:
    """Build ``name``, load the oracle weights, run ``predict`` once (cached per model)."""
    if name not in _RUNS:
        import paddle

        from instseg_core.modeling.build import build_model

        require_oracle(name)
        model = build_model(name)
        model.eval()
        shapes = state_shapes(name)
        missing, unexpected = model.set_state_dict(
            {k: paddle.to_tensor(v) for k, v in weights_rule().fill(shapes).items()})
        assert not missing and not unexpected
        inp = np.load(oracle_dir(name) / "input.npz")
        tensors = {k: paddle.to_tensor(inp[k]) for k in ("image", "im_shape", "scale_factor")}
        with paddle.no_grad():
            out = model.predict(tensors)  # forward() returns its "bbox", "bbox_num" and "mask"
        feats, neck = out.pop("backbone_feats"), out.pop("neck_feats")
        _RUNS.clear()  # keep at most one model's results in memory
        _RUNS[name] = dict(
            exp=np.load(oracle_dir(name) / "expected.npz"),
            score_threshold=float(model.bbox_post_process.score_threshold),
            keep_top_k=int(model.bbox_post_process.keep_top_k),
            feats=[t.numpy() for t in feats], neck=None if neck is None else [t.numpy() for t in neck],
            out={k: (v.numpy() if hasattr(v, "numpy") else [t.numpy() for t in v]) for k, v in out.items()})
    return _RUNS[name]


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_names_and_shapes(name):
    require_oracle(name, ("state_dict.tsv",))
    from instseg_core.modeling.build import build_model, num_classes_in_weights

    model = build_model(name)
    sd = model.state_dict()
    shapes = state_shapes(name)
    assert set(sd) == set(shapes), (sorted(set(sd) - set(shapes))[:10], sorted(set(shapes) - set(sd))[:10])
    assert list(sd) == list(shapes)  # same order as the reference state_dict()
    bad = {k: (tuple(sd[k].shape), s) for k, s in shapes.items() if tuple(sd[k].shape) != s}
    assert not bad, bad
    assert num_classes_in_weights(name, sd) == 80


def test_num_classes_changes_only_class_layers():
    from instseg_core.modeling.build import build_model, num_classes_in_weights

    sd = build_model("MaskRCNN-ResNet50-FPN", num_classes=3).state_dict()
    assert tuple(sd["bbox_head.bbox_score.weight"].shape) == (1024, 4)
    assert tuple(sd["bbox_head.bbox_delta.weight"].shape) == (1024, 12)
    assert tuple(sd["mask_head.mask_fcn_logits.weight"].shape) == (3, 256, 1, 1)
    assert num_classes_in_weights("MaskRCNN-ResNet50-FPN", sd) == 3


# The C4 model's full run sends 1000 RoIs through res5 (~0.8 TMAC: minutes on a CPU); by default
# its stages are checked on samples instead (test_c4_stages_match_oracle), the full run with
# INSTSEG_FULL_ORACLES=1. Its NMS and paste are the FPN models' code, fully checked below.
# Two more run only with INSTSEG_FULL_ORACLES=1 to keep CI short, as each combines parts the
# default runs check on their own: R101-vd (R101-FPN's depth + R50-vd's stem and shortcuts) and
# Cascade-SSLDv2 (Cascade-R50-FPN's heads on the R50-vd backbone). All 8 matched when last run.
FULL_ONLY = {"MaskRCNN-ResNet50", "MaskRCNN-ResNet101-vd-FPN", "Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN"}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_outputs_match_oracle(name):
    if name in FULL_ONLY and not os.environ.get("INSTSEG_FULL_ORACLES"):
        pytest.skip(f"set INSTSEG_FULL_ORACLES=1 for the full {name} oracle run (see FULL_ONLY)")
    if not oracle_available(name):
        pytest.skip(f"shared/oracles/{name} not available")
    _check_run(name, _run(name))


def _check_run(name: str, run: dict) -> None:
    """Every comparison of ``test_outputs_match_oracle`` on a :func:`_run` result."""
    exp, out = run["exp"], run["out"]
    final = {k: out[k] for k in ("bbox", "bbox_num", "mask")}

    # 1. backbone and FPN features
    errors = {f"feat/backbone/{i}": feature_error(exp, f"feat/backbone/{i}", f) for i, f in enumerate(run["feats"])}
    if run["neck"] is not None:
        errors.update({f"feat/neck/{i}": feature_error(exp, f"feat/neck/{i}", f) for i, f in enumerate(run["neck"])})
    assert len(run["feats"]) == (1 if run["neck"] is None else 4)
    failed = {k: v for k, v in errors.items() if not v <= REL_TOL}
    assert not failed, f"features beyond {REL_TOL} * std: {failed}"

    # 2. proposals, as a set: each expected one paired with a predicted one within ROI_TOL. The RPN's
    # top-k and NMS follow near-ties, so another CPU's rounding reorders proposals (MKL's AVX2 and
    # AVX-512 kernels swap two of R50-vd's) and could swap one at a cut-off: MIN_PAIRED of them
    # must pair, and the per-proposal rows below are compared on the paired ones.
    rois = out["rpn_rois"][0]
    assert rois.shape[0] == int(out["rpn_rois_num"][0])
    nearest = nearest_rows(exp["feat/rpn_head/0/0"], rois, ROI_TOL)
    paired = nearest >= 0
    unpaired = int((~paired).sum())
    assert len(paired) == int(exp["feat/rpn_head/1"][0]) and unpaired <= (1 - MIN_PAIRED) * len(paired), unpaired
    assert abs(rois.shape[0] - len(paired)) <= unpaired

    # 3. box head, rows paired through the proposals (a summary through its sampled rows)
    probs = out["bbox_probs"][nearest[paired]]
    assert float(np.abs(probs - exp["feat/bbox_head/0/1"][paired]).max()) <= PROB_TOL
    delta_err = paired_feature_error(exp, "feat/bbox_head/0/0", out["bbox_deltas"], nearest)
    assert delta_err <= REL_TOL, delta_err
    if "feat/bbox_head_refined_rois/0" in exp.files:
        refined = out["final_rois"][0][nearest[paired]]
        assert float(np.abs(refined - exp["feat/bbox_head_refined_rois/0"][paired]).max()) <= ROI_TOL

    # 4. detections, as sets; a row may be unmatched only at a decision boundary (the score
    # threshold, or the lowest kept score when the output is cut at keep_top_k), or, one per
    # unpaired proposal, where a proposal differs (README rules 2 and 5)
    assert final["bbox"].dtype == np.float32 and final["bbox"].shape[1:] == (6,)
    assert final["bbox_num"].dtype == np.int32 and final["bbox_num"].shape == (1,)
    assert final["mask"].dtype == np.uint8 and set(np.unique(final["mask"]).tolist()) <= {0, 1}
    n_exp, n_got = int(exp["bbox_num"][0]), int(final["bbox_num"][0])
    assert final["bbox"].shape[0] == n_got and final["mask"].shape == (n_got, 480, 640)
    pairs = match_rows(exp["bbox"], final["bbox"], score_tol=SCORE_TOL, box_tol=BOX_TOL)
    boundaries = [run["score_threshold"]] + ([float(exp["bbox"][:, 1].min())] if n_exp == run["keep_top_k"] else [])
    exp_miss, got_miss, off = detection_misses(exp["bbox"], final["bbox"], pairs, boundaries, SCORE_TOL)
    assert max(len(exp_miss), len(got_miss)) <= MAX_MISSES and len(off) <= min(unpaired, MAX_MISSES), \
        f"unmatched: {len(exp_miss)} expected, {len(got_miss)} predicted detections; off a boundary: {off}"
    max_ds = max(abs(float(final["bbox"][j, 1] - exp["bbox"][i, 1])) for i, j in pairs)
    max_db = max(float(np.abs(final["bbox"][j, 2:] - exp["bbox"][i, 2:]).max()) for i, j in pairs)

    # 5. masks (pasted) and per-box probabilities, through the detection pairs
    bad, worst, prob_err = [], 0.0, 0.0
    for i, j in pairs:
        a, b = exp["mask"][i].astype(bool), final["mask"][j].astype(bool)
        xor, union = int(np.count_nonzero(a ^ b)), int(np.count_nonzero(a | b))
        worst = max(worst, xor / max(union, 1))
        if xor > max(0.01 * union, 64):
            bad.append((i, xor, union))
        prob_err = max(prob_err, float(np.abs(out["mask_probs"][j] - exp["feat/mask_head"][i]).max()))
    print(f"{name}: proposals paired {int(paired.sum())}/{len(paired)} (same order: "
          f"{bool(np.array_equal(nearest, np.arange(len(nearest))))}), delta err {delta_err:.2e}, "
          f"detections {n_got}/{n_exp}, matched {len(pairs)}, max|dscore| {max_ds:.2e}, "
          f"max|dbox| {max_db:.3f} px, worst mask xor/union {worst:.2e}, mask prob err {prob_err:.2e}, "
          f"feature errors max {max(errors.values()):.2e}")
    assert not bad, bad
    assert prob_err <= PROB_TOL, prob_err


def test_oracle_check_tolerates_reordered_and_replaced_proposals():
    """The comparison of ``test_outputs_match_oracle`` on a run whose proposals come out as on
    another CPU: two neighbours swapped (rows the oracle's summary of the box deltas samples: the
    positional comparison gave ``delta_err`` 0.88 on an AVX-512 Xeon) and one replaced by another
    box (a flip at the RPN's cut-off). Every per-proposal output moves with its proposal."""
    name = "MaskRCNN-ResNet50-FPN"
    require_oracle(name)
    run = _run(name)
    exp = run["exp"]
    rows = exp["feat/bbox_head/0/0/idx"] // exp["feat/bbox_head/0/0/shape"][1]  # sampled rows
    a = int(rows[0])
    b = a + 1 if a + 1 < 1000 else a - 1
    order = np.arange(1000)
    order[[a, b]] = order[[b, a]]
    out = dict(run["out"])
    for key in ("rpn_rois", "final_rois"):
        out[key] = [out[key][0][order].copy()]
    out["bbox_deltas"], out["bbox_probs"] = out["bbox_deltas"][order].copy(), out["bbox_probs"][order].copy()
    out["rpn_rois"][0][-1] += 8.0  # another proposal in place of the last one
    assert feature_error(exp, "feat/bbox_head/0/0", out["bbox_deltas"]) > 0.1  # by position: fails
    _check_run(name, dict(run, out=out))


def test_c4_stages_match_oracle():
    """MaskRCNN-ResNet50 (C4) stage by stage: res4 features, the 1000 proposals (as a set), the
    res5 box head on 48 of them, and the res5 mask head on 6 expected detections' boxes."""
    import paddle

    from instseg_core.modeling.build import build_model

    name = "MaskRCNN-ResNet50"
    require_oracle(name)
    model = build_model(name)
    model.eval()
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights_rule().fill(state_shapes(name)).items()})
    inp = np.load(oracle_dir(name) / "input.npz")
    exp = np.load(oracle_dir(name) / "expected.npz")
    with paddle.no_grad():
        feats = model.backbone(paddle.to_tensor(inp["image"]))
        assert feature_error(exp, "feat/backbone/0", feats[0].numpy()) <= REL_TOL
        rois, rois_num = model.rpn_head(feats, paddle.to_tensor(inp["im_shape"]))
        got_rois = rois[0].numpy()
        assert got_rois.shape[0] == int(exp["feat/rpn_head/1"][0])
        nearest = nearest_rows(exp["feat/rpn_head/0/0"], got_rois, ROI_TOL)
        paired = np.flatnonzero(nearest >= 0)
        assert len(nearest) - len(paired) <= (1 - MIN_PAIRED) * len(nearest)
        sample = paired[np.linspace(0, len(paired) - 1, 48).astype(int)]  # expected rows
        sub = paddle.to_tensor(got_rois[nearest[sample]])
        _, probs = model.bbox_head(feats, [sub], paddle.to_tensor([len(sample)], dtype="int32"))
        assert float(np.abs(probs.numpy() - exp["feat/bbox_head/0/1"][sample]).max()) <= PROB_TOL
        # mask head on expected detections (original-image boxes back to input pixels)
        rows = exp["bbox"][:6].copy()
        sy, sx = (float(v) for v in inp["scale_factor"][0])
        rows[:, 2:] = rows[:, 2:] * np.array([sx, sy, sx, sy], np.float32)
        mask_probs = model.mask_head(feats, paddle.to_tensor(rows), paddle.to_tensor([6], dtype="int32"),
                                     feat_func=model.bbox_head.head)
    # boxes went through the output's rounding, so allow a little more than for exact inputs
    assert float(np.abs(mask_probs.numpy() - exp["feat/mask_head"][:6]).max()) <= 0.02


def test_empty_image_gives_placeholder_row():
    """No detection above the threshold: one placeholder row [0, 0, 0, 0, 1/sx, 1/sy] with an
    empty mask, bbox_num 1 (the reference's behaviour)."""
    import paddle

    from instseg_core.modeling.mask_rcnn import mask_rcnn

    paddle.seed(0)
    model = mask_rcnn("MaskRCNN-ResNet50-FPN", num_classes=2)
    model.eval()
    model.bbox_post_process.score_threshold = 2.0  # nothing can pass
    inputs = {"image": paddle.zeros([1, 3, 64, 96]), "im_shape": paddle.to_tensor([[60.0, 90.0]]),
              "scale_factor": paddle.to_tensor([[0.5, 0.5]])}
    with paddle.no_grad():
        out = {k: v.numpy() for k, v in model(inputs).items()}
    assert out["bbox_num"].tolist() == [1]
    np.testing.assert_allclose(out["bbox"], [[0, 0, 0, 0, 2, 2]])
    assert out["mask"].shape == (1, 120, 180) and out["mask"].dtype == np.uint8 and not out["mask"].any()


def _paste_reference(masks: np.ndarray, boxes: np.ndarray, im_h: int, im_w: int) -> np.ndarray:
    """The paste as one ``grid_sample`` (zero padding) over an [N, H, W, 2] grid of pixel centres
    normalised to each box."""
    import paddle
    import paddle.nn.functional as F

    x0, y0, x1, y1 = np.split(boxes.astype(np.float32), 4, axis=1)
    gy = ((np.arange(im_h, dtype=np.float32) + 0.5) - y0) / (y1 - y0) * 2 - 1  # [N, H]
    gx = ((np.arange(im_w, dtype=np.float32) + 0.5) - x0) / (x1 - x0) * 2 - 1  # [N, W]
    grid = np.stack(np.broadcast_arrays(gx[:, None, :], gy[:, :, None]), axis=-1).astype(np.float32)
    return F.grid_sample(paddle.to_tensor(masks[:, None]), paddle.to_tensor(grid), align_corners=False)[:, 0].numpy()


@pytest.mark.parametrize("m", [28, 14])
def test_paste_masks_matches_grid_sample(m):
    """paste_masks (two matmuls with 1-D bilinear weights) equals grid_sample with zero padding:
    boxes inside, across the border, larger than the canvas and below one pixel."""
    import paddle

    from instseg_core.modeling.heads.roi_heads import paste_masks

    rng = np.random.default_rng(0)
    im_h, im_w = 37, 53
    boxes = np.array([[3.2, 4.7, 30.1, 20.9], [-10.0, -5.5, 12.3, 40.0], [40.0, 30.0, 70.0, 45.0],
                      [-20.0, -20.0, 80.0, 60.0], [10.2, 11.6, 10.9, 12.1], [0.0, 0.0, 1.0, 1.0]], np.float32)
    masks = rng.random((len(boxes), m, m)).astype(np.float32)
    ref = _paste_reference(masks, boxes, im_h, im_w)
    got = paste_masks(paddle.to_tensor(masks), paddle.to_tensor(boxes), paddle.to_tensor(im_h, dtype="int32"),
                      paddle.to_tensor(im_w, dtype="int32")).numpy()
    assert got.shape == (len(boxes), im_h, im_w) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # box 2 starts at (40, 30), cells 30/m x 15/m px: zero from half a cell outside the box on
    cols, rows = np.arange(im_w) + 0.5 < 40 - 15 / m, np.arange(im_h) + 0.5 < 30 - 7.5 / m
    assert not got[2][:, cols].any() and not got[2][rows].any() and got[2][~rows][:, ~cols].any()


def test_to_original_images_pastes_uint8_masks_per_image():
    """A batch of two: each image's masks pasted at its own original size, thresholded to uint8
    0/1 and zero-padded to the largest size (the grid_sample paste as the reference)."""
    import paddle

    from instseg_core.modeling.mask_rcnn import mask_rcnn

    model = mask_rcnn("MaskRCNN-ResNet50-FPN", num_classes=2)
    model.eval()
    rng = np.random.default_rng(1)
    rows = np.array([[0, 0.9, 4, 6, 40, 50], [1, 0.8, 20, 2, 90, 30], [0, 0.7, 0, 0, 96, 64],
                     [1, 0.6, 10, 10, 30, 44], [0, 0.5, 50, 5, 79, 47]], np.float32)  # input pixels
    probs = rng.random((5, 28, 28)).astype(np.float32)
    im_shape = np.array([[64, 96], [48, 80]], np.float32)
    scale = np.array([[0.5, 0.5], [0.4, 0.5]], np.float32)
    with paddle.no_grad():
        out = model.to_original_images(paddle.to_tensor(rows), paddle.to_tensor([3, 2], dtype="int32"),
                                       paddle.to_tensor(probs), paddle.to_tensor(im_shape), paddle.to_tensor(scale))
    mask, bbox = out["mask"].numpy(), out["bbox"].numpy()
    assert out["bbox_num"].numpy().tolist() == [3, 2]
    assert mask.dtype == np.uint8 and mask.shape == (5, 128, 192) and set(np.unique(mask).tolist()) <= {0, 1}
    for i, (start, stop, (oh, ow)) in enumerate([(0, 3, (128, 192)), (3, 5, (120, 160))]):
        ref = _paste_reference(probs[start:stop], bbox[start:stop, 2:], oh, ow)
        got = mask[start:stop]
        assert not got[:, oh:].any() and not got[:, :, ow:].any()
        differ = got[:, :oh, :ow] != (ref >= model.mask_threshold)
        assert not differ.any() or np.abs(ref[differ] - model.mask_threshold).max() < 1e-5, i
