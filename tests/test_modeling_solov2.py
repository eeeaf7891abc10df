"""SOLOv2 (ResNet50-b + FPN + SOLOv2 heads + matrix-NMS post-process) against the reference oracle.

Checks the state-dict names, order and shapes against ``state_dict.tsv`` (including the three
layers the official files list under two names), the intermediate features ``feat/backbone/*``,
``feat/neck/*``, ``feat/mask_head``, ``feat/solov2_head/{0,1}/*`` and the final outputs of
``expected.npz`` with the rules of ``shared/oracles/README.md``, plus the post-process quirks
(padding row, y-scale output size) and matrix NMS on a hand-made case.
"""
from __future__ import annotations

import numpy as np
import pytest
from oracle_utils import feature_error, match_with_masks, oracle_available, oracle_dir, state_shapes, weights_rule

MODEL = "SOLOv2"
FOLDER = oracle_dir(MODEL)
needs_oracle = pytest.mark.skipif(not oracle_available(MODEL), reason="shared/oracles/SOLOv2 not available")

REL_TOL = 2e-3  # continuous features: max|got - exp| <= REL_TOL * std(exp)
PROB_ABS_TOL = 1e-3  # category probability maps (after point-NMS)
MAX_FLIPPED_CELLS = 4  # point-NMS can flip a cell between its score and 0 on a near-tie
SCORE_TOL = 1e-3

# official name -> the second name of the same tensor (shared/oracles/SOLOv2/meta.json "aliases")
ALIASES = {
    "solov2_head.bbox_head.solo_kernel.weight": "solov2_head.solo_kernel.weight",
    "solov2_head.bbox_head.solo_kernel.bias": "solov2_head.solo_kernel.bias",
    "solov2_head.bbox_head.solo_cate.weight": "solov2_head.solo_cate.weight",
    "solov2_head.bbox_head.solo_cate.bias": "solov2_head.solo_cate.bias",
    "mask_head.mask_feat_head.conv_pred.0.conv.weight": "mask_head.conv_pred.conv.weight",
    "mask_head.mask_feat_head.conv_pred.0.norm.weight": "mask_head.conv_pred.norm.weight",
    "mask_head.mask_feat_head.conv_pred.0.norm.bias": "mask_head.conv_pred.norm.bias",
}


@pytest.fixture(scope="module")
def run():
    """Build SOLOv2, record its state dict, load the oracle weights and run the eval forward once,
    keeping every intermediate the oracle stores."""
    import paddle

    from instseg_core.modeling.build import build_model

    shapes = state_shapes(MODEL)
    model = build_model(MODEL)
    model.eval()
    sd = model.state_dict()
    record = dict(keys=list(sd), shapes={k: tuple(v.shape) for k, v in sd.items()},
                  ptrs={k: v.data_ptr() if hasattr(v, "data_ptr") else id(v) for k, v in sd.items()},
                  same_object={k: sd[k] is sd[a] for k, a in ALIASES.items()})
    missing, unexpected = model.set_state_dict(
        {k: paddle.to_tensor(v) for k, v in weights_rule().fill(shapes).items()})
    assert not missing and not unexpected
    inp = np.load(FOLDER / "input.npz")
    tensors = {k: paddle.to_tensor(inp[k]) for k in ("image", "im_shape", "scale_factor")}
    with paddle.no_grad():
        body = model.backbone(tensors["image"])
        feats = model.neck(body)
        mask_feat = model.mask_head(feats)
        cate_maps, kernel_maps = model.solov2_head(feats)
        out = model.post_process(cate_maps, kernel_maps, mask_feat, tensors["im_shape"],
                                 tensors["scale_factor"])
        full = model(tensors)  # the plain forward gives the same
    got = {f"feat/backbone/{i}": t.numpy() for i, t in enumerate(body)}
    got.update({f"feat/neck/{i}": t.numpy() for i, t in enumerate(feats)})
    got["feat/mask_head"] = mask_feat.numpy()
    got.update({f"feat/solov2_head/0/{i}": t.numpy() for i, t in enumerate(cate_maps)})
    got.update({f"feat/solov2_head/1/{i}": t.numpy() for i, t in enumerate(kernel_maps)})
    return dict(shapes=shapes, sd=record, feats=got, out={k: v.numpy() for k, v in out.items()},
                full={k: v.numpy() for k, v in full.items()}, exp=np.load(FOLDER / "expected.npz"))


@needs_oracle
def test_state_dict_matches_reference(run):
    shapes, sd = run["shapes"], run["sd"]
    assert len(shapes) == 340
    assert sd["keys"] == list(shapes), (sorted(set(sd["keys"]) - set(shapes))[:10],
                                        sorted(set(shapes) - set(sd["keys"]))[:10])
    bad = {k: (sd["shapes"][k], s) for k, s in shapes.items() if sd["shapes"][k] != s}
    assert not bad, bad
    # the alias pairs are one tensor under two names: 333 distinct tensors
    assert all(sd["same_object"].values()), sd["same_object"]
    assert len(set(sd["ptrs"].values())) == 333


@pytest.mark.filterwarnings("ignore:Skip loading")  # each pass loads one name of each pair only
def test_aliases_load_under_either_name():
    """Loading either name of an alias pair (or both) sets the one shared tensor."""
    import paddle

    from instseg_core.modeling.heads.solov2_head import SOLOv2Head, SOLOv2MaskHead

    heads = {"solov2_head": SOLOv2Head(), "mask_head": SOLOv2MaskHead()}
    rs = np.random.RandomState(0)
    for use_alias in (False, True):
        values = {}
        for canonical, alias in ALIASES.items():
            prefix, name = canonical.split(".", 1)
            key = alias.split(".", 1)[1] if use_alias else name
            shape = heads[prefix].state_dict()[name].shape
            values.setdefault(prefix, {})[key] = rs.normal(size=shape).astype("float32")
        for prefix, vals in values.items():
            head = heads[prefix]
            missing, _ = head.set_state_dict({k: paddle.to_tensor(v) for k, v in vals.items()})
            sd = head.state_dict()
            for canonical, alias in ALIASES.items():
                p, name = canonical.split(".", 1)
                if p != prefix:
                    continue
                a = alias.split(".", 1)[1]
                expected = vals[a if use_alias else name]
                np.testing.assert_array_equal(sd[name].numpy(), expected)
                np.testing.assert_array_equal(sd[a].numpy(), expected)


@needs_oracle
def test_features_match_oracle(run):
    """From the input side: backbone, neck, mask feature and kernel maps within 2e-3 * std; the
    category probability maps within 1e-3 absolute (a few point-NMS flips allowed)."""
    exp, got = run["exp"], run["feats"]
    errors = {}
    for prefix, count in (("feat/backbone", 4), ("feat/neck", 5), ("feat/mask_head", None),
                          ("feat/solov2_head/1", 5)):
        names = [prefix] if count is None else [f"{prefix}/{i}" for i in range(count)]
        for name in names:
            errors[name] = feature_error(exp, name, got[name])
    print("normalised errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    failed = {k: v for k, v in errors.items() if not v <= REL_TOL}
    assert not failed, f"features beyond {REL_TOL} * std: {failed}"
    for i, s in enumerate((40, 36, 24, 16, 12)):
        e, g = exp[f"feat/solov2_head/0/{i}"], got[f"feat/solov2_head/0/{i}"]
        assert g.shape == e.shape == (1, s, s, 80)
        diff = np.abs(g - e)
        flipped = int(np.count_nonzero(diff > PROB_ABS_TOL))
        print(f"solov2_head/0/{i}: max|d| {diff.max():.2e}, cells beyond {PROB_ABS_TOL}: {flipped}")
        assert flipped <= MAX_FLIPPED_CELLS
        # a flipped cell is one where either side is 0 (suppressed by point-NMS)
        far = diff > PROB_ABS_TOL
        assert np.all((g[far] == 0) | (e[far] == 0))


@needs_oracle
def test_outputs_match_oracle(run):
    exp, out = run["exp"], run["out"]
    assert list(out) == ["bbox_num", "cate_label", "cate_score", "segm"]
    for k in out:
        np.testing.assert_array_equal(out[k], run["full"][k])
    assert out["segm"].dtype == np.uint8 and out["cate_label"].dtype == np.int64
    assert out["cate_score"].dtype == np.float32 and out["bbox_num"].dtype == np.int64
    assert out["bbox_num"].shape == (1,)
    assert set(np.unique(out["segm"]).tolist()) <= {0, 1}
    n_exp, n_got = int(exp["bbox_num"][0]), int(out["bbox_num"][0])
    assert n_got == n_exp == len(out["cate_label"]) == len(out["cate_score"])
    assert out["segm"].shape == (n_got, 480, 640)
    # scores come out highest first; the last row is the padding row (label 0, score 0)
    assert np.all(np.diff(out["cate_score"]) <= 0)
    assert int(out["cate_label"][-1]) == 0 and float(out["cate_score"][-1]) == 0.0

    # rows of [label, score] (SOLOv2 has no boxes)
    m = match_with_masks(np.stack([exp["cate_label"], exp["cate_score"]], 1), exp["segm"],
                         np.stack([out["cate_label"], out["cate_score"]], 1), out["segm"], score_tol=SCORE_TOL)
    print(f"rows {n_got}/{n_exp}: {m}")
    assert m.unmatched == 0 and m.mask_failures == 0, m


def test_padding_row_and_y_scale_output_size():
    """With nothing above the score threshold the result is the padding row alone; the output
    size uses the y scale for both axes (``int(im_shape / scale_y + 0.5)``)."""
    import paddle

    from instseg_core.modeling.solov2 import solov2

    paddle.seed(0)
    model = solov2(num_classes=3)
    model.eval()
    model.solov2_head.score_threshold = 2.0  # sigmoid scores never pass
    inputs = {"image": paddle.uniform([1, 3, 64, 96], min=-1.0, max=1.0),
              "im_shape": paddle.to_tensor([[60.0, 90.0]]),
              "scale_factor": paddle.to_tensor([[0.5, 0.25]])}
    with paddle.no_grad():
        out = {k: v.numpy() for k, v in model(inputs).items()}
    assert out["bbox_num"].tolist() == [1]
    assert out["cate_label"].tolist() == [0] and out["cate_score"].tolist() == [0.0]
    assert out["segm"].shape == (1, 120, 180) and out["segm"].dtype == np.uint8


def test_matrix_nms_gaussian_decay():
    """Hand-made case: a same-class overlap decays the lower score by exp(-sigma iou^2) / its
    compensation; another class does not decay; scores below the update threshold go, except the
    last (lowest-scored) row, which is always kept."""
    import paddle

    from instseg_core.modeling.solov2 import mask_matrix_nms

    masks = np.zeros((4, 4, 4), "float32")
    masks[0, :2, :] = 1  # 8 px
    masks[1, :2, :2] = 1  # 4 px inside mask 0: IoU 0.5 with it
    masks[2, :2, :] = 1  # same pixels as mask 0, other class
    masks[3, 3, 3] = 1  # disjoint
    labels = np.array([1, 1, 2, 1], "int64")
    scores = np.array([0.9, 0.5, 0.8, 0.04], "float32")
    areas = masks.reshape(4, -1).sum(1)
    probs = masks * 0.9
    t = paddle.to_tensor
    p, s, l = mask_matrix_nms(t(probs), t(masks), t(labels), t(scores), t(areas), sigma=2.0)
    s, l = s.numpy(), l.numpy()
    assert l.tolist() == [1, 2, 1, 1]
    np.testing.assert_allclose(s, [0.9, 0.8, 0.5 * np.exp(-2.0 * 0.25), 0.04], rtol=1e-6)
    assert p.shape == [4, 4, 4]


def test_build_model_and_class_count():
    from instseg_core.modeling.build import build_model, num_classes_in_weights
    from instseg_core.modeling.solov2 import SOLOv2

    model = build_model(MODEL, num_classes=3)
    assert isinstance(model, SOLOv2) and model.num_classes == 3
    assert num_classes_in_weights(MODEL, model.state_dict()) == 3
    # SOLOv2's own width options pass through (slim variants); another family's do not
    slim = build_model(MODEL, num_classes=3, seg_feat_channels=64, stacked_convs=2)
    assert len(slim.solov2_head.kernel_convs) == 2
    with pytest.raises(ValueError, match="width_mult"):
        build_model(MODEL, width_mult=0.5)
