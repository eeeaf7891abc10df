"""PP-HGNetV2 backbone of Mask-RT-DETR-{S,M,L,X,H} against the reference oracles.

Per size: the ``backbone.*`` state-dict names and shapes equal the official ones
(``state_dict.tsv``), and with the synthetic weights of ``weights_rule.py`` the eval outputs
equal ``feat/backbone/0..3`` (strides 4/8/16/32) of ``expected.npz`` within the tolerances of
``shared/oracles/README.md`` (max|got-exp| <= 2e-3 * std(exp), or the summary rules).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ORACLES = Path(__file__).resolve().parents[2] / "shared" / "oracles"
SIZES = ["S", "M", "L", "X", "H"]
REL_TOL = 2e-3
EXPECTED_CHANNELS = {"S": [64, 256, 512, 1024], "M": [96, 384, 768, 1536],
                     "L": [128, 512, 1024, 2048], "X": [128, 512, 1024, 2048],
                     "H": [192, 512, 1024, 2048]}


def _folder(size):
    return ORACLES / f"Mask-RT-DETR-{size}"


def _available(size):
    f = _folder(size)
    return all((f / n).exists() for n in ("state_dict.tsv", "expected.npz", "input.npz")) and \
        (ORACLES / "weights_rule.py").exists()


def _backbone_shapes(size):
    out = {}
    for line in (_folder(size) / "state_dict.tsv").read_text().splitlines()[1:]:
        k, s, _ = line.split("\t")
        if k.startswith("backbone."):
            out[k] = tuple(int(x) for x in s.split(","))
    return out


def _compare(exp, name, got):
    """Normalised error: max|got-exp|/std (full array) or the max of the summary errors."""
    if name in exp.files:
        e = exp[name]
        assert got.shape == e.shape, (name, got.shape, e.shape)
        return float(np.abs(got.astype(np.float64) - e).max()) / float(e.std())
    shape = tuple(int(v) for v in exp[name + "/shape"])
    assert got.shape == shape, (name, got.shape, shape)
    std = float(exp[name + "/std"])
    g = got.astype(np.float64)
    errs = [abs(g.mean() - float(exp[name + "/mean"])),
            abs(g.std() - std),
            float(np.abs(g.reshape(-1)[exp[name + "/idx"]] - exp[name + "/val"]).max())]
    return max(errs) / std


@pytest.mark.parametrize("size", SIZES)
def test_hgnetv2_matches_oracle(size):
    if not _available(size):
        pytest.skip(f"shared/oracles/Mask-RT-DETR-{size} not available")
    import paddle
    import paddle.nn as nn

    from instseg_core.modeling.backbones.hgnetv2 import HGNetV2, hgnetv2

    if str(ORACLES) not in sys.path:
        sys.path.insert(0, str(ORACLES))
    import weights_rule

    class Holder(nn.Layer):
        def __init__(self):
            super().__init__()
            self.backbone = hgnetv2(size)

    model = Holder()
    model.eval()
    assert isinstance(model.backbone, HGNetV2)
    assert model.backbone.out_channels == EXPECTED_CHANNELS[size]

    shapes = _backbone_shapes(size)
    sd = model.state_dict()
    assert set(sd) == set(shapes), (sorted(set(shapes) - set(sd))[:5], sorted(set(sd) - set(shapes))[:5])
    bad = [k for k in shapes if tuple(sd[k].shape) != shapes[k]]
    assert not bad, bad[:5]
    assert list(sd) == list(shapes)  # same order as the reference state_dict()

    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights_rule.fill(shapes).items()})
    exp = np.load(_folder(size) / "expected.npz")
    image = paddle.to_tensor(np.load(_folder(size) / "input.npz")["image"])
    with paddle.no_grad():
        feats = model.backbone(image)
    assert len(feats) == 4
    errs = {i: _compare(exp, f"feat/backbone/{i}", f.numpy()) for i, f in enumerate(feats)}
    for i, f in enumerate(feats):
        assert f.shape[2] == image.shape[2] // (4 * 2 ** i)
    assert all(e <= REL_TOL for e in errs.values()), errs


def test_hgnetv2_unknown_size():
    from instseg_core.modeling.backbones.hgnetv2 import hgnetv2

    with pytest.raises(ValueError):
        hgnetv2("Q")
