"""PP-YOLOE_seg-S backbone (CSPResNet) and neck (CustomCSPPAN) against the reference oracle.

Checks state-dict names/shapes against the official ones (``state_dict.tsv``) and the eval
features ``feat/backbone/0..2`` / ``feat/neck/0..2`` of ``expected.npz`` with the tolerances
of ``shared/oracles/README.md`` (max|got-exp| <= 2e-3 * std(exp), or the summary rules).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ORACLES = Path(__file__).resolve().parents[2] / "shared" / "oracles"
FOLDER = ORACLES / "PP-YOLOE_seg-S"

pytestmark = pytest.mark.skipif(not (FOLDER / "expected.npz").exists(),
                                reason="shared/oracles/PP-YOLOE_seg-S not available")

REL_TOL = 2e-3


def _shapes(prefixes=("backbone.", "neck.")):
    lines = (FOLDER / "state_dict.tsv").read_text().splitlines()[1:]
    out = {}
    for line in lines:
        k, s, _ = line.split("\t")
        if k.startswith(prefixes):
            out[k] = tuple(int(x) for x in s.split(","))
    return out


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


def _compare(exp, name, got):
    """Return the normalised error max|got-exp|/std(exp) (full) or the max of the summary errors."""
    if name in exp.files:
        e = exp[name]
        assert got.shape == e.shape, (name, got.shape, e.shape)
        std = float(e.std())
        return float(np.abs(got.astype(np.float64) - e).max()) / std
    shape = tuple(exp[name + "/shape"])
    assert got.shape == shape, (name, got.shape, shape)
    std = float(exp[name + "/std"])
    g = got.astype(np.float64)
    errs = [abs(g.mean() - float(exp[name + "/mean"])),
            abs(g.std() - std),
            float(np.abs(g.reshape(-1)[exp[name + "/idx"]] - exp[name + "/val"]).max())]
    return max(errs) / std


@pytest.fixture(scope="module")
def model_and_shapes():
    return _build(), _shapes()


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

    sys.path.insert(0, str(ORACLES))
    try:
        import weights_rule
    finally:
        sys.path.remove(str(ORACLES))

    model, shapes = model_and_shapes
    weights = weights_rule.fill(shapes)
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
            errors[name] = _compare(exp, name, t.numpy())
    print("normalised errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    failed = {k: v for k, v in errors.items() if not v <= REL_TOL}
    assert not failed, f"features beyond {REL_TOL} * std: {failed}"
