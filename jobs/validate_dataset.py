"""Entry point: validate a COCO instance-segmentation dataset (local or S3) on a Ray cluster.

    python -m jobs.validate_dataset --dataset DIR_OR_S3_URI --output OUT [--sample-num 10] [--max-examples 20]
    ray job submit --working-dir . -- python -m jobs.validate_dataset --dataset s3://bucket/ds --output out

Writes OUT/check_dataset_result.json (PaddleX's schema plus "deep_check"), demo images and the
histogram, like `instseg run ... -o Global.mode=check_dataset`. Exit status 1 when the dataset
fails the check (check_pass false or a fatal error), 2 (one line, before Ray starts) when it cannot
be found or reached or a flag is out of range.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from instseg_core.io import S3Options
from jobs._common import add_ray_flags, connect_ray, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.validate_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--output", required=True, help="local directory for the result files")
    p.add_argument("--sample-num", type=int, default=10)
    p.add_argument("--max-examples", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="images per Ray task")
    p.add_argument("--s3-endpoint")
    add_ray_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    from instseg_core.datasets.coco import DatasetError
    from pipelines.batch_predict import JobSettingsError
    from pipelines.validate import validate_dataset

    s3 = S3Options.from_env(args.s3_endpoint)
    try:
        check_job(args, s3)  # a user mistake is one line, before Ray starts
    except JobSettingsError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect_ray(args.ray_address, args.num_cpus)
    try:
        result = validate_dataset(args.dataset, args.output, sample_num=args.sample_num,
                                  max_examples=args.max_examples, batch_size=args.batch_size, s3=s3)
    except DatasetError as e:
        print(f"validate_dataset: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("check_pass", "attributes", "deep_check") if k in result}, indent=2))
    return 0 if result.get("check_pass") else 1


def check_job(args: argparse.Namespace, s3: S3Options) -> None:
    """Numbers in range, the output not a file, the dataset's root found (and its storage
    reachable); raises :class:`pipelines.batch_predict.JobSettingsError` with one line."""
    from instseg_core.datasets.coco import DatasetError, find_dataset_root
    from instseg_core.io import is_remote
    from pipelines.batch_predict import JobSettingsError, storage_errors
    from pipelines.validate import find_remote_root

    for name in ("sample_num", "max_examples", "batch_size"):
        if getattr(args, name) < (0 if name == "sample_num" else 1):
            raise JobSettingsError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if os.path.isfile(args.output):
        raise JobSettingsError(f"--output {args.output} is a file; give a directory")
    with storage_errors("dataset", args.dataset):
        try:
            find_remote_root(args.dataset, s3) if is_remote(args.dataset) else find_dataset_root(args.dataset)
        except DatasetError as e:
            raise JobSettingsError(f"dataset: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
