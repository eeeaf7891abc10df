"""PP-YOLOE_seg-S backbone (CSPResNet) and neck (CustomCSPPAN) against the reference oracle.

Checks state-dict names/shapes against the official ones (``state_dict.tsv``) and the eval
features ``feat/backbone/0..2`` / ``feat/neck/0..2`` of ``expected.npz`` with the tolerances
of ``shared/oracles/README.md`` (max|got-exp| <= 2e-3 * std(exp), or the summary rules).
"""
from __future__ import annotations

import numpy as np
import pytest
from oracle_utils import feature_error, match_rows, oracle_dir, state_shapes, weights_rule

MODEL = "PP-YOLOE_seg-S"
FOLDER = oracle_dir(MODEL)

pytestmark = pytest.mark.skipif(not (FOLDER / "expected.npz").exists(),
                                reason="shared/oracles/PP-YOLOE_seg-S not available")

REL_TOL = 2e-3


def _build():
    import paddle.nn as nn

    from instseg_core.modeling.backbones.cspresnet import cspresnet_s
    from instseg_core.modeling.necks.custom_csp_pan import custom_csp_pan_s

    class Wrapper(nn.Layer):
        def __init__(self):
            super().__init__()
            self.backbone = cspresnet_s()
            self.neck = custom_csp_pan_s(in_channels=self.backbone.out_channels)

        def forward(self, image):
            feats = self.backbone(image)
            return feats, self.neck(feats)

    return Wrapper()


@pytest.fixture(scope="module")
def model_and_shapes():
    return _build(), state_shapes(MODEL, ("backbone.", "neck."))


def test_state_dict_names_and_shapes(model_and_shapes):
    model, shapes = model_and_shapes
    sd = model.state_dict()
    assert set(sd) == set(shapes), (sorted(set(sd) - set(shapes))[:10],
                                    sorted(set(shapes) - set(sd))[:10])
    assert list(sd) == list(shapes)  # same order as the reference state_dict()
    bad = {k: (tuple(sd[k].shape), shapes[k]) for k in shapes if tuple(sd[k].shape) != shapes[k]}
    assert not bad, bad


def test_features_match_oracle(model_and_shapes):
    import paddle

    model, shapes = model_and_shapes
    weights = weights_rule().fill(shapes)
    assert set(weights) == set(shapes)
    missing, unexpected = model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights.items()})
    assert not missing and not unexpected
    model.eval()
    image = np.load(FOLDER / "input.npz")["image"]
    exp = np.load(FOLDER / "expected.npz")
    with paddle.no_grad():
        feats, neck = model(paddle.to_tensor(image))
    assert len(feats) == 3 and len(neck) == 3
    errors = {}
    for prefix, outs in (("feat/backbone", feats), ("feat/neck", neck)):
        for i, t in enumerate(outs):
            name = f"{prefix}/{i}"
            errors[name] = feature_error(exp, name, t.numpy())
    print("normalised errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    failed = {k: v for k, v in errors.items() if not v <= REL_TOL}
    assert not failed, f"features beyond {REL_TOL} * std: {failed}"


# --------------------------------------------------------------------------- full model (head + post-process)

SCORE_TOL = 1e-3
BOX_TOL = 1.0
PROB_ABS_TOL = 1e-3


@pytest.fixture(scope="module")
def full_run():
    """Build PP-YOLOE_seg-S, check the KEEP constant, fill the oracle weights, run once."""
    import paddle

    from instseg_core.modeling.build import build_model

    rule = weights_rule()
    shapes = state_shapes(MODEL)
    model = build_model("PP-YOLOE_seg-S")
    model.eval()
    sd = model.state_dict()
    exp = np.load(FOLDER / "expected.npz")
    keep = {k: sd[k].numpy().copy() for k in rule.KEEP & set(sd)}
    weights = rule.fill(shapes)
    assert set(weights) | set(keep) == set(shapes)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights.items()})
    inp = np.load(FOLDER / "input.npz")
    tensors = {k: paddle.to_tensor(inp[k]) for k in ("image", "im_shape", "scale_factor")}
    with paddle.no_grad():
        head = [t.numpy() for t in model.head_outputs(tensors["image"])]
        out = {k: v.numpy() for k, v in model(tensors).items()}
    return dict(model=model, shapes=shapes, sd_keys=list(sd), sd_shapes={k: tuple(v.shape) for k, v in sd.items()},
                keep=keep, exp=exp, head=head, out=out)


def test_full_state_dict_matches_reference(full_run):
    shapes, keys = full_run["shapes"], full_run["sd_keys"]
    assert keys == list(shapes), (sorted(set(keys) - set(shapes))[:10], sorted(set(shapes) - set(keys))[:10])
    bad = {k: (full_run["sd_shapes"][k], s) for k, s in shapes.items() if full_run["sd_shapes"][k] != s}
    assert not bad, bad


def test_keep_constant(full_run):
    exp, keep = full_run["exp"], full_run["keep"]
    assert set(keep) == {"yolo_head.proj_conv.weight"}
    for k, v in keep.items():
        assert np.array_equal(v, exp["keep/" + k]), k
    # still the built-in constant after loading the filled weights
    w = full_run["model"].state_dict()["yolo_head.proj_conv.weight"].numpy()
    assert np.array_equal(w, np.arange(17, dtype="float32").reshape(1, 17, 1, 1))


def test_head_features_match_oracle(full_run):
    exp, head = full_run["exp"], full_run["head"]
    assert len(head) == 6
    # class scores after sigmoid: absolute tolerance
    e0 = exp["feat/yolo_head/0"]
    assert head[0].shape == e0.shape
    err0 = float(np.abs(head[0] - e0).max())
    assert err0 <= PROB_ABS_TOL, err0
    errors = {f"feat/yolo_head/{i}": feature_error(exp, f"feat/yolo_head/{i}", head[i]) for i in range(1, 6)}
    print("yolo_head/0 abs error", err0, "normalised errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    failed = {k: v for k, v in errors.items() if not v <= REL_TOL}
    assert not failed, f"head features beyond {REL_TOL} * std: {failed}"


def test_final_outputs_match_oracle(full_run):
    exp, out = full_run["exp"], full_run["out"]
    assert set(out) == {"bbox", "bbox_num", "mask"}
    assert out["bbox"].dtype == np.float32 and out["bbox"].ndim == 2 and out["bbox"].shape[1] == 6
    assert out["bbox_num"].dtype == np.int32 and out["bbox_num"].shape == (1,)
    assert out["mask"].dtype == np.float32
    assert set(np.unique(out["mask"]).tolist()) <= {0.0, 1.0}
    n_exp, n_got = int(exp["bbox_num"][0]), int(out["bbox_num"][0])
    assert out["bbox"].shape[0] == n_got and out["mask"].shape == (n_got, 480, 640)
    assert abs(n_got - n_exp) <= 2, (n_got, n_exp)

    pairs = match_rows(exp["bbox"], out["bbox"], score_tol=SCORE_TOL, box_tol=BOX_TOL)
    unmatched = n_exp - len(pairs)
    assert unmatched <= 2, f"{unmatched} expected detections unmatched"
    max_ds = max(abs(float(out["bbox"][j, 1] - exp["bbox"][i, 1])) for i, j in pairs)
    max_db = max(float(np.abs(out["bbox"][j, 2:] - exp["bbox"][i, 2:]).max()) for i, j in pairs)

    bad_masks, worst = [], 0.0
    for i, j in pairs:
        a = exp["mask"][i].astype(bool)
        b = out["mask"][j] > 0.5
        xor = int(np.count_nonzero(a ^ b))
        union = int(np.count_nonzero(a | b))
        worst = max(worst, xor / max(union, 1))
        if xor > max(0.01 * union, 64):
            bad_masks.append((int(i), xor, union))
    print(f"detections {n_got}/{n_exp}, matched {len(pairs)}, max|dscore| {max_ds:.2e}, "
          f"max|dbox| {max_db:.3f} px, worst xor/union {worst:.2e}")
    assert not bad_masks, bad_masks


def test_anchors_follow_input_size():
    import paddle

    from instseg_core.modeling.heads.ppyoloe_ins import ppyoloe_ins_head_s

    head = ppyoloe_ins_head_s()
    feats = [paddle.zeros([1, c, h, w]) for c, (h, w) in zip((384, 192, 96), ((8, 12), (16, 24), (32, 48)))]
    points, strides = head.generate_anchors(feats)
    assert tuple(points.shape) == (8 * 12 + 16 * 24 + 32 * 48, 2)
    p, s = points.numpy(), strides.numpy()[:, 0]
    assert np.array_equal(p[:3], [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5]])
    assert np.array_equal(p[12], [0.5, 1.5])
    assert (s[:96] == 32).all() and (s[96:96 + 384] == 16).all() and (s[96 + 384:] == 8).all()


def test_empty_result_and_other_sizes():
    import paddle

    from instseg_core.modeling.build import build_model

    model = build_model("PP-YOLOE_seg-S")
    model.eval()
    model.yolo_head.score_threshold = 2.0  # nothing can pass
    inputs = {"image": paddle.zeros([1, 3, 128, 192]),
              "im_shape": paddle.to_tensor([[128.0, 192.0]]),
              "scale_factor": paddle.to_tensor([[0.5, 0.5]])}
    with paddle.no_grad():
        out = model(inputs)
    assert tuple(out["bbox"].shape) == (1, 6) and float(out["bbox"].abs().sum()) == 0.0
    assert int(out["bbox_num"][0]) == 0
    assert tuple(out["mask"].shape) == (1, 256, 384)


def test_build_model_names():
    from instseg_core.models import MODEL_NAMES
    from instseg_core.modeling.build import _BUILDERS, build_model
    from instseg_core.modeling.ppyoloe_seg import PPYOLOESeg

    assert "PP-YOLOE_seg-S" in MODEL_NAMES and len(MODEL_NAMES) == 15
    assert isinstance(build_model("PP-YOLOE_seg-S", num_classes=3), PPYOLOESeg)
    assert set(_BUILDERS) == set(MODEL_NAMES)  # every official name has a network
    with pytest.raises(ValueError):
        build_model("no-such-model")
