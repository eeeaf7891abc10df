"""Cost of cross-rank BatchNorm (training/cross_rank_bn.py): training-step time with and without it.

The ``shapes_tiny`` PP-YOLOE_seg (84 BatchNorm layers) on batch 4 of 160 px synthetic images:

1. one process: ``CrossRankBatchNorm`` (no all-reduce with one rank) vs Paddle's fused BatchNorm:
   the price of computing the moments with separate ops;
2. 2 Ray Train gloo workers x batch 4 (``Train.sync_bn`` off vs on): the price including one
   all-reduce per layer in the forward and one in the backward pass.

Prints seconds per step (median of the timed steps after warm-up) and the ratios, measured in this
one run (the machine is noisy: compare the ratios, not absolute times).

    .venv/bin/python bench/cross_rank_bn.py [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # noqa: F401  (puts the repo on sys.path)

ARCH = {"width_mult": 0.25, "num_protos": 32}


def _step_times(root: str, steps: int, rank: int, world: int, sync_bn: bool) -> list[float]:
    """Seconds of each forward/backward/optimizer step on this rank's half of a fixed batch."""
    import paddle

    from instseg_core.modeling import build_model
    from instseg_core.training.cross_rank_bn import convert_to_cross_rank_bn
    from instseg_core.training.data import CocoInstanceDataset, load_batch

    ds = CocoInstanceDataset(Path(root) / "annotations" / "instance_train.json", Path(root) / "images")
    inputs, targets = load_batch(ds, list(range(rank, 4 * world, world)), size=160)
    paddle.seed(0)
    model = build_model("PP-YOLOE_seg-S", num_classes=4, **ARCH)
    if sync_bn:
        convert_to_cross_rank_bn(model)
    model.train()
    net = paddle.DataParallel(model) if world > 1 else model
    opt = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        net(inputs, targets)["loss"].backward()
        opt.step()
        opt.clear_grad()
        times.append(time.perf_counter() - t0)
    return times


def _worker_loop(config: dict) -> None:
    from pipelines.train import init_paddle_distributed

    rank, world = init_paddle_distributed()
    times = _step_times(config["root"], config["steps"], rank, world, config["sync_bn"])
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(times))


def _median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[max(1, len(times) // 4):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)

    import ray

    from instseg_core.datasets.synthetic import make_dataset
    from pipelines.train import train_on_ray

    work = Path(tempfile.mkdtemp(prefix="instseg-bn-bench-"))
    root = str(make_dataset(work / "shapes", num_train=8, num_val=1, seed=0))

    one = {bn: _median_after_warmup(_step_times(root, a.steps, 0, 1, bn)) for bn in (False, True)}
    print(f"1 process x batch 4: BatchNorm {one[False]:.3f} s/step, CrossRankBatchNorm {one[True]:.3f} s/step, "
          f"ratio {one[True] / one[False]:.2f}", flush=True)

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    two = {}
    for bn in (False, True):
        out = work / f"times_{bn}.json"
        result = train_on_ray(_worker_loop, {"root": root, "steps": a.steps, "sync_bn": bn, "out": str(out)},
                              num_workers=2, storage_path=str(work / "runs"), name=f"bn_{bn}")
        if result.error is not None:
            print(f"Ray run failed: {result.error}")
            return 1
        two[bn] = _median_after_warmup(json.loads(out.read_text()))
    ray.shutdown()
    print(f"2 gloo workers x batch 4: sync_bn off {two[False]:.3f} s/step, on {two[True]:.3f} s/step, "
          f"ratio {two[True] / two[False]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
