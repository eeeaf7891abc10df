"""Proof that training learns: the small shapes config trained from scratch on CPU.

1. Generates the synthetic shapes dataset (train + held-out val, fixed seeds).
2. Trains ``instseg_core/configs/shapes_tiny.yaml`` in one process and prints the held-out mask AP
   and the minutes it took (target: mask AP >= 0.5).
3. ``--ray``: trains the same config on Ray Train with 2 workers (gloo), each with half the batch,
   so both runs see the same samples in the same number of steps, and prints both APs and their
   difference (target: |AP_2 - AP_1| <= 0.03).
4. ``--export-demo DIR``: exports the best single-process model there (the repo's ``samples/model``).

    .venv/bin/python bench/train_synthetic.py [--epochs 50] [--ray] [--export-demo samples/model]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # noqa: F401  (puts the repo on sys.path)

from instseg_core.config import apply_overrides, load_config
from instseg_core.datasets.synthetic import make_dataset


def _config(dataset: Path, output: Path, epochs: int, batch_size: int, eval_interval: int, seed: int) -> dict:
    return apply_overrides(load_config("shapes_tiny"), [
        "Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={output}",
        f"Train.epochs_iters={epochs}", f"Train.batch_size={batch_size}",
        f"Train.eval_interval={eval_interval}", f"Train.seed={seed}"])


def _best(output: Path) -> float:
    return float(json.loads((output / "train_result.json").read_text())["models"]["best"]["score"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    p.add_argument("--train", type=int, default=480)
    p.add_argument("--val", type=int, default=60)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--eval-interval", type=int, default=0,
                   help="evaluate every N epochs (default: only after the last)")
    p.add_argument("--ray", action="store_true", help="also train on Ray Train with 2 workers")
    p.add_argument("--seed", type=int, default=0, help="Train.seed (weights, data order, augmentation)")
    p.add_argument("--reuse-single", action="store_true",
                   help="take the single-process result already in --work/single instead of training it again")
    p.add_argument("--export-demo", default=None, help="export the single-process model to this dir")
    a = p.parse_args(argv)

    every = a.eval_interval or a.epochs
    work = Path(a.work or tempfile.mkdtemp(prefix="instseg-train-bench-"))
    dataset = make_dataset(work / "shapes", num_train=a.train, num_val=a.val, seed=0)
    print(f"dataset: {a.train} train / {a.val} held-out val images in {dataset}", flush=True)

    from instseg_core.modes import run_config

    out1 = work / "single"
    t0 = time.time()
    if not (a.reuse_single and (out1 / "train_result.json").is_file()):
        if run_config(_config(dataset, out1, a.epochs, 8, every, a.seed)) != 0:
            print((out1 / "train_result.json").read_text())
            return 1
    minutes1 = (time.time() - t0) / 60
    ap1 = _best(out1)
    print(f"single process: held-out mask AP {ap1:.4f} after {a.epochs} epochs, {minutes1:.1f} min "
          f"(target >= 0.5: {'met' if ap1 >= 0.5 else 'NOT met'})", flush=True)

    if a.export_demo:
        dest = Path(a.export_demo)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(out1 / "best_model" / "inference", dest)
        size = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
        print(f"demo model exported to {dest} ({size:.1f} MB)")

    if a.ray:
        import ray

        from pipelines.train import fine_tune_on_ray

        ray.init(address="local", num_cpus=4, include_dashboard=False)
        out2 = work / "ray2"
        t0 = time.time()
        result = fine_tune_on_ray(_config(dataset, out2, a.epochs, 4, every, a.seed), num_workers=2,
                                  storage_path=str(work / "ray_runs"), name="shapes2")
        minutes2 = (time.time() - t0) / 60
        ray.shutdown()
        if result.error is not None:
            print(f"Ray run failed: {result.error}")
            return 1
        ap2 = _best(out2)
        diff = ap2 - ap1
        print(f"Ray Train, 2 workers x batch 4: held-out mask AP {ap2:.4f}, {minutes2:.1f} min; "
              f"difference to 1 process {diff:+.4f} (target |diff| <= 0.03: "
              f"{'met' if abs(diff) <= 0.03 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
