"""Fine-tune a model on Ray Train: ``python -m jobs.train -c CONFIG -o Key=value ... --num-workers N``.

The config is the module YAML of ``instseg run`` (``Global.mode`` is forced to ``train``), so a
run that works on one machine scales out unchanged::

    ray job submit --working-dir . -- python -m jobs.train -c PP-YOLOE_seg-S \\
        -o Global.dataset_dir=s3://bucket/shapes -o Train.num_classes=4 \\
        --num-workers 4 --use-gpu --storage-path s3://bucket/runs --name shapes-ft --max-failures 2

Prints the final metrics and checkpoint location as JSON; exit status 0 on success, 2 (one line,
before Ray starts) for a mistake in the config, the dataset or the storage path.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from instseg_core.config import ConfigError, apply_overrides, check_config, load_config
from jobs._common import add_ray_flags, connect_ray, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True, help="module YAML path or model name")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. -o Train.epochs_iters=20 (repeatable)")
    p.add_argument("--num-workers", type=int, default=2, help="data-parallel workers (default 2)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--storage-path", required=True, help="checkpoint storage: shared path or s3://bucket/prefix")
    p.add_argument("--name", default="instseg-train", help="run name; rerunning a name resumes it")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts allowed (default 2)")
    add_ray_flags(p)
    return p


def check_job(cfg: dict, args: argparse.Namespace) -> None:
    """The user's mistakes, before Ray starts: bad Train settings, a dataset that is missing or has
    another class count than ``Train.num_classes``, a storage path that is a file or unreachable.
    Raises :class:`pipelines.batch_predict.JobSettingsError` with one line."""
    import os

    from instseg_core.datasets.coco import DatasetError
    from instseg_core.io import S3Options, fsspec_fs, is_remote
    from instseg_core.training.settings import TrainSettings
    from pipelines.batch_predict import JobSettingsError, storage_errors
    from pipelines.evaluate import load_eval_dataset

    if args.num_workers < 1 or args.max_failures < 0 or args.cpus_per_worker <= 0:
        raise JobSettingsError("--num-workers and --cpus-per-worker must be positive, --max-failures >= 0")
    try:
        settings = TrainSettings.from_config(cfg)
    except ValueError as e:
        raise JobSettingsError(str(e)) from None
    s3 = S3Options.from_env()
    with storage_errors("dataset", settings.dataset_dir):
        try:
            train = load_eval_dataset(settings.dataset_dir, "train", s3)
            load_eval_dataset(settings.dataset_dir, "val", s3)
        except DatasetError as e:
            raise JobSettingsError(f"dataset: {e}") from None
    if len(train.category_ids) != settings.num_classes:
        names = ", ".join(train.category_names[:10]) + (", ..." if len(train.category_names) > 10 else "")
        raise JobSettingsError(f"Train.num_classes={settings.num_classes} but {train.annotation_uri} has "
                               f"{len(train.category_ids)} categories ({names}); set -o Train.num_classes="
                               f"{len(train.category_ids)}")
    if not is_remote(args.storage_path) and os.path.isfile(args.storage_path):
        raise JobSettingsError(f"--storage-path {args.storage_path} is a file; give a directory or s3:// prefix")
    with storage_errors("storage path", args.storage_path):
        fsspec_fs(args.storage_path, s3).exists(args.storage_path)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    from pipelines.batch_predict import JobSettingsError

    try:  # a user mistake is one line, before Ray starts
        cfg = apply_overrides(load_config(args.config), list(args.override) + ["Global.mode=train"])
        check_config(cfg)
        check_job(cfg, args)
    except (ConfigError, JobSettingsError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipelines.train import fine_tune_on_ray

    connect_ray(args.ray_address, args.num_cpus)
    result = fine_tune_on_ray(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu,
                              cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path,
                              name=args.name, max_failures=args.max_failures)
    summary = {"metrics": result.metrics, "checkpoint": getattr(result.checkpoint, "path", None),
               "output": str(cfg["Global"].get("output", "output")), "error": str(result.error) if result.error else None}
    print(json.dumps(summary, indent=2, default=str))
    return 0 if result.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
