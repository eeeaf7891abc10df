"""PP-HGNetV2 backbone of Mask-RT-DETR-{S,M,L,X,H} against the reference oracles.

Per size: the ``backbone.*`` state-dict names and shapes equal the official ones
(``state_dict.tsv``), and with the synthetic weights of ``weights_rule.py`` the eval outputs
equal ``feat/backbone/0..3`` (strides 4/8/16/32) of ``expected.npz`` within the tolerances of
``shared/oracles/README.md`` (max|got-exp| <= 2e-3 * std(exp), or the summary rules).
"""
from __future__ import annotations

import numpy as np
import pytest
from oracle_utils import feature_error, mask_rtdetr_name, oracle_dir, require_oracle, state_shapes
from oracle_utils import weights_rule as load_weights_rule

SIZES = ["S", "M", "L", "X", "H"]
REL_TOL = 2e-3
EXPECTED_CHANNELS = {"S": [64, 256, 512, 1024], "M": [96, 384, 768, 1536],
                     "L": [128, 512, 1024, 2048], "X": [128, 512, 1024, 2048],
                     "H": [192, 512, 1024, 2048]}


@pytest.mark.parametrize("size", SIZES)
def test_hgnetv2_matches_oracle(size):
    require_oracle(mask_rtdetr_name(size))
    import paddle
    import paddle.nn as nn

    from instseg_core.modeling.backbones.hgnetv2 import HGNetV2, hgnetv2

    weights_rule = load_weights_rule()

    class Holder(nn.Layer):
        def __init__(self):
            super().__init__()
            self.backbone = hgnetv2(size)

    model = Holder()
    model.eval()
    assert isinstance(model.backbone, HGNetV2)
    assert model.backbone.out_channels == EXPECTED_CHANNELS[size]

    shapes = state_shapes(mask_rtdetr_name(size), "backbone.")
    sd = model.state_dict()
    assert set(sd) == set(shapes), (sorted(set(shapes) - set(sd))[:5], sorted(set(sd) - set(shapes))[:5])
    bad = [k for k in shapes if tuple(sd[k].shape) != shapes[k]]
    assert not bad, bad[:5]
    assert list(sd) == list(shapes)  # same order as the reference state_dict()

    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights_rule.fill(shapes).items()})
    exp = np.load(oracle_dir(mask_rtdetr_name(size)) / "expected.npz")
    image = paddle.to_tensor(np.load(oracle_dir(mask_rtdetr_name(size)) / "input.npz")["image"])
    with paddle.no_grad():
        feats = model.backbone(image)
    assert len(feats) == 4
    errs = {i: feature_error(exp, f"feat/backbone/{i}", f.numpy()) for i, f in enumerate(feats)}
    for i, f in enumerate(feats):
        assert f.shape[2] == image.shape[2] // (4 * 2 ** i)
    assert all(e <= REL_TOL for e in errs.values()), errs


def test_hgnetv2_unknown_size():
    from instseg_core.modeling.backbones.hgnetv2 import hgnetv2

    with pytest.raises(ValueError):
        hgnetv2("Q")
