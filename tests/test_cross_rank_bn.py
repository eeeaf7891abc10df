"""Cross-rank BatchNorm (training/cross_rank_bn.py): 2 gloo ranks of batch 4 train like 1 process of batch 8.

The check runs the real small PP-YOLOE_seg (the shapes_tiny config) on real synthetic images: one
training step's parameter gradients (after DataParallel's all-reduce) and the
BatchNorm running statistics of 2 Ray Train workers must equal one process's on the union batch.
With plain per-rank BatchNorm they must not (so the test can tell the difference).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from instseg_core.training.cross_rank_bn import CrossRankBatchNorm, convert_to_cross_rank_bn

ARCH = {"width_mult": 0.25, "num_protos": 32}
BATCH = 8


def test_matches_batchnorm_in_one_process():
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.ReLU(),
                               paddle.nn.BatchNorm2D(4, use_global_stats=True))
    ref = copy.deepcopy(net)
    assert convert_to_cross_rank_bn(net) == 1  # the frozen one stays
    assert isinstance(net[1], CrossRankBatchNorm) and isinstance(net[3], paddle.nn.BatchNorm2D)
    assert list(net.state_dict()) == list(ref.state_dict())
    x = paddle.randn([4, 3, 8, 8]) * 3 + 50  # |mean| >> std: the shifted moments must stay accurate
    for m in (net, ref):
        m.train()
        (m(x) ** 2).sum().backward()
    np.testing.assert_allclose(net(x).numpy(), ref(x).numpy(), rtol=1e-4, atol=1e-3)
    for (name, a), (_, b) in zip(net.named_parameters(), ref.named_parameters()):
        if b.grad is not None and name != "0.bias":  # a bias before BN has (numerically) zero gradient
            np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-3, atol=1e-3 * float(b.grad.abs().max()))
    for key in ("1._mean", "1._variance"):
        np.testing.assert_allclose(net.state_dict()[key].numpy(), ref.state_dict()[key].numpy(), rtol=1e-4)
    net.eval(), ref.eval()
    np.testing.assert_allclose(net(x).numpy(), ref(x).numpy(), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------- 2 ranks vs 1

def _step(model, inputs, targets, net=None) -> dict:
    """One forward/backward; the parameter gradients and BN running statistics (a rank's loss
    values are its share of the total, so the gradients are what must agree)."""
    model.train()
    losses = (net or model)(inputs, targets)
    losses["loss"].backward()
    out = {f"grad/{n}": p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    out.update({f"state/{k}": v.numpy() for k, v in model.state_dict().items() if k.endswith(("_mean", "_variance"))})
    return out


def _fresh_model(init_path: str):
    from instseg_core.modeling import build_model

    model = build_model("PP-YOLOE_seg-S", num_classes=4, **ARCH)
    model.set_state_dict(paddle.load(init_path))
    return model


def _two_rank_loop(config: dict) -> None:
    """Each rank: half of the batch, with plain and with cross-rank BatchNorm; rank 0 saves results."""
    import paddle

    from instseg_core.training.data import CocoInstanceDataset, load_batch
    from pipelines.train import init_paddle_distributed

    rank, world = init_paddle_distributed()
    ds = CocoInstanceDataset(config["ann"], config["images"])
    inputs, targets = load_batch(ds, list(range(rank, BATCH, world)), size=160, train=False)
    results = {}
    for mode in ("plain", "cross_rank"):
        model = _fresh_model(config["init"])
        if mode == "cross_rank":
            convert_to_cross_rank_bn(model)
        results.update({f"{mode}/{k}": v for k, v in _step(model, inputs, targets, paddle.DataParallel(model)).items()})
    if rank == 0:
        np.savez(config["out"], **results)


def _assert_close(name: str, got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    err = float(np.abs(got - want).max())
    assert err <= rtol * max(float(np.abs(want).max()), 1e-3), f"{name}: max error {err:.3g}"


def test_two_ranks_equal_one_process(ray_local, tmp_path):
    from instseg_core.datasets.synthetic import make_dataset
    from instseg_core.modeling import build_model
    from instseg_core.training.data import CocoInstanceDataset, load_batch
    from instseg_core.training.engine import _init_priors
    from pipelines.train import train_on_ray

    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = make_dataset(tmp_path / "shapes", num_train=BATCH, num_val=1, seed=3)
    ann, images = str(root / "annotations" / "instance_train.json"), str(root / "images")
    paddle.seed(0)
    model = build_model("PP-YOLOE_seg-S", num_classes=4, **ARCH)
    _init_priors(model)
    init = str(tmp_path / "init.pdparams")
    paddle.save(model.state_dict(), init)

    inputs, targets = load_batch(CocoInstanceDataset(ann, images), list(range(BATCH)), size=160, train=False)
    want = _step(_fresh_model(init), inputs, targets)
    out = tmp_path / "two_ranks.npz"
    result = train_on_ray(_two_rank_loop, {"ann": ann, "images": images, "init": init, "out": str(out)},
                          num_workers=2, storage_path=str(tmp_path / "runs"), name="bn2")
    assert result.error is None
    got = dict(np.load(out))

    for key, value in want.items():
        _assert_close(key, got[f"cross_rank/{key}"], value, rtol=2e-3)
    # per-rank statistics give other gradients and running statistics: what the layer fixes
    plain_err = max(float(np.abs(got[f"plain/{k}"] - v).max() / max(np.abs(v).max(), 1e-3))
                    for k, v in want.items())
    assert plain_err > 0.05
