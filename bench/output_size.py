"""Output size: the pipeline's Parquet bytes per instance vs dense masks and PaddleX-style JSON.

Runs the batch pipeline once (local Ray, tiny exported MaskRCNN-ResNet50-FPN, the COCO photos in
../shared when present, else samples/), or reads an existing run with ``--output DIR``, then
prints bytes per instance of:

* Parquet: all ``parts/*.parquet`` bytes (zstd; every column: uri, ids, boxes, scores, labels,
  RLE strings, run id, ...) / instances; and the RLE ``counts`` strings alone;
* dense masks: ``H*W`` bytes per instance (uint8 full-image mask) and ``H*W/8`` (bit-packed);
* PaddleX-style JSON: ``InstanceSegResult(..., mask_format="paddlex").json`` (masks as nested int
  lists cropped to their boxes), as ``save_to_json`` writes it (``indent=4``, PaddleX's default) and
  compact (``separators=(",", ":")``);

and the ratios of each to Parquet. The tiny model's masks are blobs of a thresholded, upsampled
conv map inside each box: their RLE is of the same order as real object masks, but not identical.

    python bench/output_size.py [--output DIR_OF_A_FINISHED_RUN] [--images N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, image_pool  # noqa: E402

MODEL = "MaskRCNN-ResNet50-FPN"


def run_pipeline(tmp: Path, n: int | None) -> Path:
    import ray

    from tiny_models import export_tiny_model
    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict

    pool = image_pool()[:n] if n else image_pool()
    src = tmp / "in"
    src.mkdir()
    for p in pool:
        (src / p.name).symlink_to(p)
    model_dir = export_tiny_model(MODEL, tmp / "model")
    out = tmp / "out"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        run_batch_predict(BatchPredictConfig(input=str(src), output=str(out), model_dir=str(model_dir)))
    finally:
        ray.shutdown()
    return out


def measure(out: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from instseg_core.results import InstanceSegResult
    from pipelines.rows import table_instances
    from pipelines.sinks import list_parts

    parts = list_parts(str(out))
    if not parts:
        raise SystemExit(f"no part files under {out}/parts")
    m = {"parts": len(parts), "parquet": sum(os.path.getsize(p) for p in parts), "images": 0, "instances": 0,
         "rle": 0, "dense": 0, "packed": 0, "json_indent": 0, "json_compact": 0}
    rows = [r for p in parts for r in pq.read_table(p).to_pylist() if r["status"] == "ok"]
    names: dict[int, str] = {}
    for r in rows:
        names.update((it["class_id"], it["label"]) for it in r["instances"] or [])
    labels = [names.get(k, str(k)) for k in range(max(names, default=-1) + 1)] or ["object"]
    for r in rows:
        n, hw = r["num_instances"], r["height"] * r["width"]
        m["images"] += 1
        m["instances"] += n
        m["rle"] += sum(len(it["rle"]["counts"]) for it in r["instances"] or [])
        m["dense"] += n * hw
        m["packed"] += n * -(-hw // 8)
        res = InstanceSegResult(input_path=r["uri"], page_index=None, input_img=np.zeros((1, 1, 3), np.uint8),
                                instances=table_instances(r), labels=labels, mask_format="paddlex")
        data = res.json["res"]
        m["json_indent"] += len(json.dumps(data, indent=4, ensure_ascii=False).encode("utf-8"))
        m["json_compact"] += len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", help="a finished run's output dir (default: run the pipeline now)")
    ap.add_argument("--images", type=int, default=None, help="use only the first N photos (default: all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench_output_size_") as tmp_s:
        out = Path(args.output) if args.output else run_pipeline(Path(tmp_s), args.images)
        m = measure(out)
    n = m["instances"]
    if not n:
        raise SystemExit("the run has no instances")
    per = {k: m[k] / n for k in ("parquet", "rle", "dense", "packed", "json_indent", "json_compact")}
    print(f"{m['images']} ok images, {n} instances ({n / m['images']:.1f} per image), {m['parts']} part file(s), "
          f"{m['parquet']} Parquet bytes; {MODEL} (tiny export)")
    print(f"{'format':44s} {'bytes/instance':>14s} {'x Parquet':>10s}")
    rows = [("Parquet part files (zstd, all columns)", "parquet"),
            ("  of which RLE counts strings (uncompressed)", "rle"),
            ("dense uint8 mask, H*W", "dense"),
            ("dense bit-packed mask, H*W/8", "packed"),
            ("PaddleX JSON (save_to_json, indent=4)", "json_indent"),
            ("PaddleX JSON (compact)", "json_compact")]
    for title, key in rows:
        print(f"{title:44s} {per[key]:14.0f} {per[key] / per['parquet']:10.3f}")
    print(f"ratios: dense uint8 / Parquet = {per['dense'] / per['parquet']:.0f}x, "
          f"bit-packed / Parquet = {per['packed'] / per['parquet']:.1f}x, "
          f"PaddleX JSON / Parquet = {per['json_indent'] / per['parquet']:.0f}x (indent=4), "
          f"{per['json_compact'] / per['parquet']:.0f}x (compact)")


if __name__ == "__main__":
    main()
