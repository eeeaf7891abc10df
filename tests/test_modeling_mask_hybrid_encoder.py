"""Mask hybrid encoder (neck) of Mask-RT-DETR-{S,M,L,X,H} against the reference oracles.

Per size: the ``neck.*`` state-dict names, shapes and order equal the official ones
(``state_dict.tsv``). The backbone (``hgnetv2(size)``, exact) and the neck are loaded with the
synthetic weights of ``weights_rule.py`` (only ``backbone.*`` and ``neck.*`` keys are filled),
and the eval neck outputs equal ``feat/neck/0/0..2`` (strides 8/16/32) and ``feat/neck/1``
(mask feature, stride 4) of ``expected.npz`` within the tolerances of
``shared/oracles/README.md`` (max|got-exp| <= 2e-3 * std(exp), or the summary rules).
"""
from __future__ import annotations

import numpy as np
import pytest
from oracle_utils import feature_error, mask_rtdetr_name, oracle_dir, require_oracle, state_shapes
from oracle_utils import weights_rule as load_weights_rule

SIZES = ["S", "M", "L", "X", "H"]
REL_TOL = 2e-3
HIDDEN = {"S": 256, "M": 256, "L": 256, "X": 384, "H": 512}
PROTOTYPES = {"S": 128, "M": 128, "L": 32, "X": 128, "H": 128}


@pytest.mark.parametrize("size", SIZES)
def test_mask_hybrid_encoder_matches_oracle(size):
    require_oracle(mask_rtdetr_name(size))
    import paddle
    import paddle.nn as nn

    from instseg_core.modeling.backbones.hgnetv2 import hgnetv2
    from instseg_core.modeling.necks.mask_hybrid_encoder import MaskHybridEncoder, mask_hybrid_encoder

    weights_rule = load_weights_rule()

    class Holder(nn.Layer):
        def __init__(self):
            super().__init__()
            self.backbone = hgnetv2(size)
            self.neck = mask_hybrid_encoder(size)

    model = Holder()
    model.eval()
    assert isinstance(model.neck, MaskHybridEncoder)

    neck_shapes = state_shapes(mask_rtdetr_name(size), ("neck.",))
    neck_sd = {k: v for k, v in model.state_dict().items() if k.startswith("neck.")}
    assert set(neck_sd) == set(neck_shapes), (sorted(set(neck_shapes) - set(neck_sd))[:5],
                                              sorted(set(neck_sd) - set(neck_shapes))[:5])
    bad = [k for k in neck_shapes if tuple(neck_sd[k].shape) != neck_shapes[k]]
    assert not bad, bad[:5]
    assert list(neck_sd) == list(neck_shapes)  # same order as the reference state_dict()

    shapes = state_shapes(mask_rtdetr_name(size), ("backbone.", "neck."))
    assert set(model.state_dict()) == set(shapes)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights_rule.fill(shapes).items()})
    exp = np.load(oracle_dir(mask_rtdetr_name(size)) / "expected.npz")
    image = paddle.to_tensor(np.load(oracle_dir(mask_rtdetr_name(size)) / "input.npz")["image"])
    with paddle.no_grad():
        feats = model.backbone(image)
        outs, mask_feat = model.neck(feats)
    assert len(feats) == 4  # the neck must not consume the caller's list
    assert len(outs) == 3
    for i, o in enumerate(outs):
        assert list(o.shape) == [1, HIDDEN[size], image.shape[2] // (8 * 2 ** i), image.shape[3] // (8 * 2 ** i)]
    assert list(mask_feat.shape) == [1, PROTOTYPES[size], image.shape[2] // 4, image.shape[3] // 4]
    errs = {f"0/{i}": feature_error(exp, f"feat/neck/0/{i}", o.numpy()) for i, o in enumerate(outs)}
    errs["1"] = feature_error(exp, "feat/neck/1", mask_feat.numpy())
    assert all(e <= REL_TOL for e in errs.values()), errs


def test_mask_hybrid_encoder_other_input_size():
    """Position embedding is built from the feature size: a non-square input runs."""
    import paddle

    from instseg_core.modeling.necks.mask_hybrid_encoder import mask_hybrid_encoder

    paddle.seed(0)
    neck = mask_hybrid_encoder("S")
    neck.eval()
    h, w = 128, 192
    chans = [64, 256, 512, 1024]
    feats = [paddle.randn([1, c, h // s, w // s]) for c, s in zip(chans, (4, 8, 16, 32))]
    with paddle.no_grad():
        outs, mask_feat = neck(feats)
    assert [list(o.shape) for o in outs] == [[1, 256, h // s, w // s] for s in (8, 16, 32)]
    assert list(mask_feat.shape) == [1, 128, h // 4, w // 4]
    assert all(np.isfinite(o.numpy()).all() for o in outs + [mask_feat])


def test_sincos_pos_embed_2d_layout():
    from instseg_core.modeling.necks.mask_hybrid_encoder import sincos_pos_embed_2d

    w, h, d = 3, 2, 8
    pe = sincos_pos_embed_2d(w, h, d).numpy()
    assert pe.shape == (1, w * h, d)
    omega = 1.0 / (10000.0 ** (np.arange(d // 4) / (d // 4)))
    gw, gh = np.meshgrid(np.arange(w), np.arange(h), indexing="ij")
    ow, oh = gw.reshape(-1)[:, None] * omega, gh.reshape(-1)[:, None] * omega
    ref = np.concatenate([np.sin(ow), np.cos(ow), np.sin(oh), np.cos(oh)], axis=1)
    np.testing.assert_allclose(pe[0], ref, atol=1e-6)


def test_mask_hybrid_encoder_unknown_size():
    from instseg_core.modeling.necks.mask_hybrid_encoder import mask_hybrid_encoder

    with pytest.raises(ValueError):
        mask_hybrid_encoder("Q")
