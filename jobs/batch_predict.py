"""Entry point: label images with a model on a Ray cluster (or a local one).

    python -m jobs.batch_predict --input SRC --output DST (--model NAME | --model-dir DIR) \
        [--batch-size N] [--threshold T] [--device D] [--num-actors N | --min-actors N --max-actors N] \
        [--num-gpus-per-actor F] [--config job.yaml]

    ray job submit --working-dir . -- python -m jobs.batch_predict ...

SRC: a directory, s3:// prefix, glob, or a manifest (.parquet/.csv/.txt of URIs). DST: a
directory or s3:// prefix. Rerunning with the same DST resumes. Flags override YAML keys
(the keys are BatchPredictConfig's field names).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any, Sequence

import yaml

from jobs._common import add_prediction_flags, add_ray_flags, connect_ray, fail, prediction_values, setup_logging
from pipelines.batch_predict import BatchPredictConfig, JobSettingsError, check_settings, run_batch_predict
from pipelines.settings import PREDICTION_FIELDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.batch_predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with BatchPredictConfig keys")
    p.add_argument("--input")
    p.add_argument("--output")
    add_prediction_flags(p)
    p.add_argument("--rows-per-file", type=int)
    p.add_argument("--shard-size", type=int, help="URIs per input shard, the unit of resume (default 1000)")
    p.add_argument("--shards-per-pass", type=int, help="shards per Ray Dataset execution; bounds the driver's "
                                                       "memory (default 100)")
    p.add_argument("--retry-errors", choices=("transient", "all", "none"),
                   help="on a rerun, redo error rows of transient kinds (default), of every kind, or none")
    p.add_argument("--labelme", action="store_true", default=None, help="also write LabelMe JSON per image")
    p.add_argument("--label-studio", action="store_true", default=None,
                   help="also write Label Studio tasks with predictions (label_studio/tasks.json) and their "
                        "labeling config (label_studio/config.xml)")
    p.add_argument("--label-studio-format", choices=("brush", "polygon"),
                   help="Label Studio regions: brush masks (default; holes and parts kept) or polygons")
    p.add_argument("--label-studio-root", metavar="DIR",
                   help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: local images become /data/local-files/?d=<path "
                        "below DIR> (default /)")
    p.add_argument("--coco-layout", choices=("auto", "single", "sharded"),
                   help="one coco_dataset.json/coco_results.json, or coco/dataset-<k>.json files (default auto: "
                        "single up to 200k images)")
    p.add_argument("--coco-root", metavar="DIR_OR_PREFIX",
                   help="COCO file_names (and LabelMe paths) relative to this (default: the input directory or "
                        "prefix; a manifest's images get bucket/key): for CVAT, the folder or prefix its task's "
                        "images are named below")
    p.add_argument("--review-top", type=int, metavar="K",
                   help="write review/queue.csv: the K images a person should check first (best-first; "
                        "columns uri,image_id,priority,reason) and their LabelMe files and Label Studio tasks")
    p.add_argument("--no-report", dest="report", action="store_false", default=None,
                   help="do not write report.html (overlays of a sample, counts per class, score histogram, errors)")
    p.add_argument("--run-id")
    add_ray_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> BatchPredictConfig:
    """YAML (if any) overlaid with the flags that were given."""
    values: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            fail(f"--config {args.config}: {e.strerror or e}")
        except yaml.YAMLError as e:
            fail(f"--config {args.config} is not valid YAML: {' '.join(str(e).split())}")
        if not isinstance(loaded, dict):
            fail(f"--config {args.config} must hold a mapping of BatchPredictConfig keys")
        values.update(loaded)
    known = {f.name for f in fields(BatchPredictConfig)}
    unknown = set(values) - known
    if unknown:
        fail(f"{args.config}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    if values.get("max_mask_side") in ("none", "None"):
        values["max_mask_side"] = None
    values.update({k: v for k, v in vars(args).items()
                   if k in known and k not in PREDICTION_FIELDS and v is not None})
    values.update(prediction_values(args))  # the prediction flags, 'none' read as None
    missing = [k for k in ("input", "output") if not values.get(k)]
    if missing:
        fail(f"missing --{' and --'.join(missing)}")
    if not values.get("model_name") and not values.get("model_dir"):
        fail("give --model NAME or --model-dir DIR")
    return BatchPredictConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        plan = check_settings(cfg)  # a user mistake is one line, before Ray starts
        connect_ray(args.ray_address, args.num_cpus)
        summary = run_batch_predict(cfg, plan)
    except JobSettingsError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0 if summary["images_written"] >= summary["images_total"] else 1


if __name__ == "__main__":
    sys.exit(main())
