"""Entry point: COCO mask/box AP of a model over a dataset (PaddleX layout), predicted on Ray.

    python -m jobs.evaluate --model-dir DIR --dataset-dir DIR_OR_S3 --output OUT [--split val] \
        [--batch-size 4] [--threshold 0.0] [--backend pycocotools|faster] [--ray-address ADDR]

    ray job submit --working-dir . -- python -m jobs.evaluate --model Mask-RT-DETR-L --dataset-dir s3://b/ds ...

Writes OUT/evaluate_result.json ({"done_flag": true, "metrics": {"AP": <mask AP>, "segm": {...},
"bbox": {...}}, ...}), OUT/coco_results.json (detections with the dataset's image and category
ids) and OUT/predictions/ (the batch-labelling outputs; a rerun with the same OUT resumes). On
failure it writes PaddleX's {"done_flag": false, "err_type", "err_msg"}: a user mistake (dataset, model,
labels, settings) is one line and exit code 2 before Ray starts; other failures exit 1, as do runs
where some images could not be predicted (they count as misses).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from jobs._common import add_prediction_flags, add_ray_flags, connect_ray, prediction_values, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", required=True, help="dataset folder or s3:// prefix (PaddleX COCO layout)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--output", required=True, help="directory or s3:// prefix for the result files")
    p.add_argument("--backend", default="pycocotools", choices=["pycocotools", "faster"])
    add_prediction_flags(p, threshold_help="score threshold of the predictions (default 0.0: AP needs "
                                           "low-score detections)")
    add_ray_flags(p)
    return p


def _record_failure(cfg, error: BaseException) -> None:
    """PaddleX's failure record in OUT/evaluate_result.json (best effort: the error is what matters)."""
    from instseg_core.io import join
    from pipelines.evaluate import RESULT_FILE
    from pipelines.sinks import write_json

    try:
        write_json(join(cfg.output, RESULT_FILE),
                   {"done_flag": False, "err_type": type(error).__name__, "err_msg": str(error)}, cfg.s3())
    except Exception:  # noqa: BLE001
        logging.getLogger("instseg").exception("cannot write %s", RESULT_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if not args.model_name and not args.model_dir:
        print("error: give --model NAME or --model-dir DIR", file=sys.stderr)
        return 2

    from pipelines.batch_predict import JobSettingsError
    from pipelines.evaluate import EvaluateConfig, LabelMismatchError, evaluate_with_ray, prepare_evaluation

    cfg = EvaluateConfig(dataset_dir=args.dataset_dir, output=args.output, split=args.split, backend=args.backend,
                         **prediction_values(args))
    try:
        plan = prepare_evaluation(cfg)  # a user mistake is one line, before Ray starts
    except (JobSettingsError, LabelMismatchError) as e:
        _record_failure(cfg, e)
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        connect_ray(args.ray_address, args.num_cpus)
        result = evaluate_with_ray(cfg, plan)
    except Exception as e:  # noqa: BLE001 - PaddleX's failure record, then a non-zero exit
        logging.getLogger("instseg").exception("evaluation failed")
        _record_failure(cfg, e)
        print(f"evaluate: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("metrics", "images", "images_failed", "detections")}, indent=2))
    return 0 if not result["images_failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
