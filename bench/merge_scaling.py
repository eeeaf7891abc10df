"""Does the batch job's merge (finish every shard, then write COCO results + COCO dataset + LabelMe)
get faster with more CPUs? The same parts merged by a local Ray of 1 CPU and of 2 CPUs.

The parts are made once: the demo model labels the sample photos (a real part, real RLE masks), and
its rows are repeated under new URIs and ids into ``--images`` rows over shards of 1000 (one part
each), as the job writes them. Each merge then runs in its own process (``ray.init(num_cpus=k)``)
on a copy of the parts: ``finish_all`` (per-shard de-duplication and counts, Ray tasks) and
``write_outputs`` (Ray tasks per group of shards; single-file COCO assembled by streaming). Each
task takes a whole CPU here (the job packs two to four of these light tasks per CPU), so 1 CPU
runs one task at a time and 2 CPUs two.
Printed: seconds per stage, images/s, and the 2-CPU / 1-CPU throughput ratio.

    .venv/bin/python bench/merge_scaling.py [--images 200000] [--layout single|sharded] [--labelme]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO

SHARD = 1000


def make_parts(out: Path, images: int) -> list[str]:
    """``images`` rows in shards of SHARD (one part each), tiled from a real run's rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO))
    from pipelines.rows import image_id_for
    from pipelines.sinks import list_parts, write_part

    seed = out / "seed"
    subprocess.run([sys.executable, "-m", "jobs.batch_predict", "--input", str(REPO / "samples" / "shapes"),
                    "--output", str(seed), "--model-dir", str(REPO / "samples" / "model"), "--num-actors", "1",
                    "--ray-address", "local", "--progress-interval-s", "0"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = pa.concat_tables(pq.read_table(p) for p in list_parts(str(seed)))
    rows = rows.filter(pa.compute.equal(rows.column("status"), "ok"))
    labels = json.loads((seed / "coco_dataset.json").read_text())["categories"]
    parts = out / "parts_src"
    for s in range(-(-images // SHARD)):
        n = min(SHARD, images - s * SHARD)
        table = rows.take(pa.array(np.arange(n) % rows.num_rows))
        uris = [f"/bench/d{s % 97:02d}/img_{s * SHARD + i:09d}.jpg" for i in range(n)]
        table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(uris))
        table = table.set_column(table.schema.get_field_index("image_id"), "image_id",
                                 pa.array([image_id_for(u) for u in uris], pa.int64()))
        write_part(table, str(parts), shard_id=f"s{s:08d}", shard_total=n)
    return [c["name"] for c in labels]


def merge_once(parts_dir: Path, cpus: int, layout: str, labelme: bool, categories: list[str]) -> dict:
    """Run in a child process: finish + write outputs over a copy of the parts with ``cpus`` CPUs."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(REPO)!r})
import ray
ray.init(num_cpus={cpus}, include_dashboard=False, logging_level="ERROR")
import pipelines.batch_predict, pipelines.merge
from pipelines.batch_predict import finish_all
from pipelines.merge import write_outputs
# one task per CPU, so that N CPUs means N tasks at a time (the job packs 2-4 light tasks per CPU)
pipelines.batch_predict.FINISH_TASK_CPUS = pipelines.merge.WRITE_TASK_CPUS = 1.0
from pipelines.sinks import list_parts, parts_by_shard
out = {str(parts_dir)!r}
t0 = time.time()
totals = finish_all(out, parts_by_shard(list_parts(out)), None)
t1 = time.time()
coco = write_outputs(out, totals["shards"], parts_by_shard(list_parts(out)), {categories!r}, image_root="/bench",
                     layout={layout!r}, labelme={labelme!r})
t2 = time.time()
print(json.dumps({{"finish_s": t1 - t0, "write_s": t2 - t1, "images": coco["images"],
                  "annotations": coco["annotations"]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--layout", default="single", choices=("single", "sharded"))
    p.add_argument("--labelme", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        categories = make_parts(tmp, args.images)
        print(f"{args.images} images in {-(-args.images // SHARD)} parts made in {time.time() - t0:.0f} s; "
              f"layout {args.layout}, LabelMe {'on' if args.labelme else 'off'}")
        print(f"{'CPUs':>4s} {'finish s':>8s} {'write s':>8s} {'total s':>8s} {'images/s':>9s} {'annotations':>11s}")
        rate = {}
        for cpus in (1, 2):
            run_dir = tmp / f"run{cpus}"
            shutil.copytree(tmp / "parts_src", run_dir)
            r = merge_once(run_dir, cpus, args.layout, args.labelme, categories)
            total = r["finish_s"] + r["write_s"]
            rate[cpus] = r["images"] / total
            print(f"{cpus:>4d} {r['finish_s']:>8.1f} {r['write_s']:>8.1f} {total:>8.1f} {rate[cpus]:>9.0f} "
                  f"{r['annotations']:>11d}", flush=True)
            shutil.rmtree(run_dir)
        print(f"throughput 2 CPUs / 1 CPU: {rate[2] / rate[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
