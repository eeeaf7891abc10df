"""Ray pipeline overhead: one SegmentationActor vs a bare predict loop, same model, images and threads.

Prints images/s of each and the ratio (pipeline / bare), all measured in this one run on one local
Ray (the machine is noisy: compare the ratio, not absolute numbers; medians of alternating trials).

* bare: ``for path in images: read bytes -> decode_image_bytes -> model.predict_arrays([img])
  -> Instances.rle_masks()`` in this process (the work the actor does per image), model loaded once
  before timing.
* pipeline: ``run_batch_predict`` with ``num_actors=1``, ``cpu_threads=T``, to a new output dir per
  trial. Its rate is the pipeline's own steady state: images delivered after its first output,
  divided by the time from its first to its last output (timestamps of the driver's progress
  updates). Excluded: Ray start-up (one Ray for all trials, plus a warm-up job), actor start and
  model load, the images of the first output (pipeline fill), and the driver's finishing steps
  after the last output (de-duplication, COCO exports, summary). The end-to-end figure from the
  summary (wall time including all of that) is printed for information.

The model is the project's tiny exported MaskRCNN-ResNet50-FPN (official weights cannot be
downloaded here): the graph is cheap, so the ratio exposes everything around it.

    python bench/pipeline_overhead.py [--images N] [--threads T] [--batch-size B] [--trials K]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, image_pool  # noqa: E402

MODEL = "MaskRCNN-ResNet50-FPN"


def make_input_dir(folder: Path, n: int) -> list[str]:
    """``n`` distinct file names (the pipeline keys images by URI) linking to the pool, repeated."""
    pool = image_pool()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img_{i:05d}{pool[i % len(pool)].suffix}"
        if not p.exists():
            p.symlink_to(pool[i % len(pool)])
        out.append(str(p))
    return out


def bare_rate(model, paths: list[str]) -> float:
    from instseg_core.inputs import decode_image_bytes

    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        inst = model.predict_arrays([decode_image_bytes(data, p)])[0]
        inst.rle_masks()
    return len(paths) / (time.perf_counter() - t0)


class _Stamps:
    """Timestamps of the pipeline's outputs, recorded by a Progress subclass in the driver."""

    events: list[tuple[float, int]] = []


def _patch_progress() -> None:
    import pipelines.batch_predict as bp

    base = bp.Progress

    class TimedProgress(base):  # type: ignore[misc, valid-type]
        def update(self, summary):
            _Stamps.events.append((time.monotonic(), summary.num_rows))
            super().update(summary)

    bp.Progress = TimedProgress  # run_batch_predict looks the name up at call time


def pipeline_run(src: str, out: str, model_dir: str, args, warm_up: bool = False) -> dict:
    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict

    _Stamps.events = []
    t0 = time.monotonic()
    cfg = BatchPredictConfig(input=src, output=out, model_dir=model_dir, batch_size=args.batch_size, num_actors=1,
                             cpu_threads=args.threads, rows_per_file=args.rows_per_file,
                             progress_interval_s=3600)
    summary = run_batch_predict(cfg)
    ev = _Stamps.events
    if warm_up:
        return summary
    if len(ev) < 3:
        raise SystemExit(f"only {len(ev)} output(s): lower --rows-per-file or raise --images to see a steady state")
    (t_first, n_first), t_last = ev[0], ev[-1][0]
    steady = (sum(n for _, n in ev) - n_first) / (t_last - t_first)
    return {"steady": steady, "e2e": summary["images_per_s"], "first_s": t_first - t0,
            "finish_s": summary["wall_time_s"] - (t_last - t0), "outputs": len(ev),
            "ok": summary["by_status"].get("ok", 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1, help="Paddle CPU threads, the actor's and the bare loop's")
    ap.add_argument("--batch-size", type=int, default=1, help="actor batch size (the bare loop predicts 1 at a time)")
    ap.add_argument("--rows-per-file", type=int, default=16, help="small, so outputs stream and can be timed")
    ap.add_argument("--trials", type=int, default=3, help="alternating trials; the median of each side is used")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray (as the tests use)")
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    from instseg_core import create_model
    from instseg_core.inputs import decode_image_bytes
    from tiny_models import export_tiny_model

    _patch_progress()
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = str(export_tiny_model(MODEL, tmp / "model"))
        paths = make_input_dir(tmp / "in", args.images)
        make_input_dir(tmp / "warm", 8)
        t = time.monotonic()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        pipeline_run(str(tmp / "warm"), str(tmp / "out_warm"), model_dir, args, warm_up=True)
        startup = time.monotonic() - t

        model = create_model(model_dir=model_dir, device="cpu", cpu_threads=args.threads)
        with open(paths[0], "rb") as f:
            model.predict_arrays([decode_image_bytes(f.read(), paths[0])])  # warm-up

        print(f"{args.images} images ({len(image_pool())} distinct photos), {MODEL} (tiny export), "
              f"{args.threads} CPU thread(s), actor batch {args.batch_size}, 1 actor, local Ray with "
              f"{args.num_cpus} logical CPUs on {os.cpu_count()} cores; median of {args.trials} alternating trials")
        print(f"excluded from the pipeline figure: Ray start-up + warm-up job ({startup:.1f} s), actor start and "
              "model load, the first output's images, the driver's exports after the last output")
        print(f"{'trial':>5s} {'bare img/s':>11s} {'pipe img/s':>11s} {'ratio':>6s} {'e2e img/s':>10s} "
              f"{'1st out s':>10s} {'finish s':>9s} {'outputs':>8s}", flush=True)
        bares, pipes = [], []
        for k in range(args.trials):
            b = bare_rate(model, paths)
            p = pipeline_run(str(tmp / "in"), str(tmp / f"out_{k}"), model_dir, args)
            if p["ok"] != args.images:
                raise SystemExit(f"pipeline wrote {p['ok']} ok rows, expected {args.images}")
            bares.append(b)
            pipes.append(p["steady"])
            print(f"{k:5d} {b:11.2f} {p['steady']:11.2f} {p['steady'] / b:6.2f} {p['e2e']:10.2f} "
                  f"{p['first_s']:10.1f} {p['finish_s']:9.1f} {p['outputs']:8d}", flush=True)
        ray.shutdown()
    b, p = statistics.median(bares), statistics.median(pipes)
    print(f"bare loop: {b:.2f} images/s   pipeline (1 actor, steady state): {p:.2f} images/s")
    paired = statistics.median(x / y for x, y in zip(pipes, bares))
    print(f"ratio pipeline / bare: {p / b:.2f} (of the medians; median of the per-trial ratios: {paired:.2f})   "
          f"target >= 0.90: {'met' if p / b >= 0.9 else 'NOT met'}")


if __name__ == "__main__":
    main()
