"""The README's batch command on the 80 COCO photos with the demo model, at batch 1 and batch 4.

Each batch size runs ``python -m jobs.batch_predict --input <photos> --model-dir samples/model
--batch-size B --labelme --ray-address local`` as its own subprocess; a sampler walks the job's
process tree (driver, Ray's daemons, actors and their predictor processes) every 0.2 s. Printed per
batch size: rows written, images/s (summary.json: from start to the last part), wall time, peak RSS
and PSS of the tree, and the largest single process at the peak (the predictor). Before the
memory work this command did not finish: the actor was killed for memory and restarted forever.

    .venv/bin/python bench/batch_job.py [--batch-sizes 1,4] [--model-dir samples/model]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, image_pool
from pipeline_memory import Sampler


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--model-dir", default=str(REPO / "samples" / "model"))
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    photos = image_pool()
    gib = 2**30
    print(f"{len(photos)} photos from {photos[0].parent}; model {args.model_dir}; local Ray, 4 logical CPUs")
    print(f"{'batch':>5s} {'rows':>5s} {'ok':>4s} {'images/s':>8s} {'wall s':>7s} {'peak RSS GiB':>12s} "
          f"{'peak PSS GiB':>12s} {'largest proc GiB':>16s} {'reserved GiB':>12s}")
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            out = Path(tmp) / f"out_{bs}"
            cmd = [sys.executable, "-m", "jobs.batch_predict", "--input", str(photos[0].parent), "--output", str(out),
                   "--model-dir", args.model_dir, "--batch-size", str(bs), "--labelme", "--ray-address", "local",
                   "--num-cpus", "4"]
            t0 = time.monotonic()
            with open(Path(tmp) / f"log_{bs}.txt", "wb") as log:
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, RAY_DEDUP_LOGS="0"))
                sampler = Sampler(proc.pid, 0.2, 1.0)
                sampler.start()
                rc = proc.wait(timeout=args.timeout)
                sampler.stop.set()
                sampler.join()
            wall = time.monotonic() - t0
            if rc != 0:
                print((Path(tmp) / f"log_{bs}.txt").read_text(errors="replace")[-3000:])
                return 1
            s = json.loads((out / "summary.json").read_text())
            largest = max((rss for rss, _ in sampler.procs_at_peak), default=0)
            print(f"{bs:5d} {s['images_written']:5d} {s['by_status'].get('ok', 0):4d} {s['images_per_s']:8.2f} "
                  f"{wall:7.1f} {sampler.peak_rss / gib:12.2f} {sampler.peak_pss / gib:12.2f} {largest / gib:16.2f} "
                  f"{s['actor_memory_gb']:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
