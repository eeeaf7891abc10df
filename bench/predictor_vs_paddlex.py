"""Predictor throughput: instseg vs PaddleX 3.7.2 on the same model dirs, images and CPU threads.

Prints images/s of each and the ratio (instseg / PaddleX), all measured in this one run (the
machine is noisy: compare ratios, not absolute numbers). PaddleX runs in its own venv
(INSTSEG_PADDLEX_PYTHON, default .venv-paddlex/bin/python), instseg in this process.

The model dirs are the project's tiny exported networks (official weights cannot be downloaded
here), so the graph is cheap and the numbers measure everything around it: decoding,
preprocessing, batching, post-processing and result building.

    python bench/predictor_vs_paddlex.py [--images N] [--rounds R] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tiny stand-in models are test scaffolding

from instseg_core import create_model  # noqa: E402
from tiny_models import export_tiny_model  # noqa: E402

# (model, batch size): PaddleX cannot batch keep-ratio models (MaskRCNN, Cascade, SOLOv2) over images of
# different sizes (np.stack fails), so for those its batch-4 figure is its batch-1 figure.
CASES = [("MaskRCNN-ResNet50-FPN", 1), ("MaskRCNN-ResNet50-FPN", 4), ("Mask-RT-DETR-L", 1), ("Mask-RT-DETR-L", 4),
         ("PP-YOLOE_seg-S", 1), ("SOLOv2", 1)]
KEEP_RATIO = {"MaskRCNN-ResNet50-FPN", "SOLOv2"}


def _images(n: int) -> list[str]:
    coco = REPO.parent / "shared" / "data" / "coco_tiny_val2017" / "val2017"
    pool = sorted(coco.glob("*.jpg")) if coco.is_dir() else []
    pool = pool or sorted((REPO / "samples").glob("*.jpg"))
    return [str(pool[i % len(pool)]) for i in range(n)]


def _ours(model_dir: Path, images: list[str], batch_size: int, rounds: int, threads: int) -> float:
    model = create_model(model_dir=model_dir, device="cpu", cpu_threads=threads)
    list(model.predict(images[:batch_size], batch_size=batch_size))  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        for res in model.predict(images, batch_size=batch_size):
            _ = res["masks"]  # build PaddleX-format masks as PaddleX does
    return rounds * len(images) / (time.perf_counter() - t0)


def _paddlex(py: str, name: str, model_dir: Path, images: list[str], batch_size: int, rounds: int,
             threads: int, tmp: Path) -> float:
    out = tmp / f"pdx_{name}_{batch_size}"
    out.mkdir(parents=True)
    from instseg_core.inference.engine import ONEDNN_OFF_BY_DEFAULT

    req = {"model_name": name, "model_dir": str(model_dir), "inputs": images, "batch_size": batch_size,
           "out_dir": str(out), "cpu_threads": threads, "bench_rounds": rounds,
           "run_mode": "paddle" if name in ONEDNN_OFF_BY_DEFAULT else "mkldnn"}
    (out / "req.json").write_text(json.dumps(req))
    env = dict(os.environ, PADDLE_PDX_CACHE_HOME=str(tmp / "pdx_home"))
    subprocess.run([py, str(REPO / "tests" / "paddlex_runner.py"), str(out / "req.json")], check=True,
                   capture_output=True, env=env)
    return json.loads((out / "bench.json").read_text())["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3, help="alternating trials; the median of each side is used")
    args = ap.parse_args()
    py = os.environ.get("INSTSEG_PADDLEX_PYTHON", str(REPO / ".venv-paddlex" / "bin" / "python"))
    images = _images(args.images)
    print(f"{len(images)} images x {args.rounds} rounds, {args.threads} CPU threads, median of {args.trials} "
          "alternating trials")
    print(f"{'model':24s} {'batch':>5s} {'instseg img/s':>14s} {'PaddleX img/s':>14s} {'ratio':>6s}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for name, bs in CASES:
            d = tmp / name
            if not d.exists():
                export_tiny_model(name, d)
            bs_pdx = 1 if name in KEEP_RATIO else bs
            theirs, ours = [], []
            for t in range(args.trials):
                theirs.append(_paddlex(py, name, d, images, bs_pdx, args.rounds, args.threads, tmp / f"t{t}_{bs}"))
                ours.append(_ours(d, images, bs, args.rounds, args.threads))
            o, p = statistics.median(ours), statistics.median(theirs)
            ratios.append(o / p)
            note = "  (PaddleX at batch 1: it cannot batch mixed sizes)" if bs_pdx != bs else ""
            print(f"{name:24s} {bs:5d} {o:14.2f} {p:14.2f} {o / p:6.2f}{note}", flush=True)
    print(f"geometric mean ratio: {statistics.geometric_mean(ratios):.2f}")


if __name__ == "__main__":
    main()
