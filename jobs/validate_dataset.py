"""Entry point: validate a COCO instance-segmentation dataset (local or S3) on a Ray cluster.

    python -m jobs.validate_dataset --dataset DIR_OR_S3_URI --output OUT [--sample-num 10] [--max-examples 20]
    ray job submit --working-dir . -- python -m jobs.validate_dataset --dataset s3://bucket/ds --output out

Writes OUT/check_dataset_result.json (PaddleX's schema plus "deep_check"), demo images and the
histogram, like `instseg run ... -o Global.mode=check_dataset`. Exit status 1 when the dataset
fails the check (check_pass false or a fatal error).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from jobs.batch_predict import connect_ray


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m jobs.validate_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--output", required=True, help="local directory for the result files")
    p.add_argument("--sample-num", type=int, default=10)
    p.add_argument("--max-examples", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="images per Ray task")
    p.add_argument("--s3-endpoint")
    p.add_argument("--ray-address")
    p.add_argument("--num-cpus", type=int)
    args = p.parse_args(argv)

    from instseg_core.datasets.coco import DatasetError
    from pipelines.storage import S3Options
    from pipelines.validate import validate_dataset

    connect_ray(args.ray_address, args.num_cpus)
    try:
        result = validate_dataset(args.dataset, args.output, sample_num=args.sample_num,
                                  max_examples=args.max_examples, batch_size=args.batch_size,
                                  s3=S3Options.from_env(args.s3_endpoint))
    except DatasetError as e:
        print(f"validate_dataset: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("check_pass", "attributes", "deep_check") if k in result}, indent=2))
    return 0 if result.get("check_pass") else 1


if __name__ == "__main__":
    sys.exit(main())
