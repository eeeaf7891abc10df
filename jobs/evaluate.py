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

from jobs.batch_predict import connect_ray


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="model_name")
    p.add_argument("--model-dir")
    p.add_argument("--dataset-dir", required=True, help="dataset folder or s3:// prefix (PaddleX COCO layout)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--output", required=True, help="directory or s3:// prefix for the result files")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.0,
                   help="score threshold of the predictions (default 0.0: AP needs low-score detections)")
    p.add_argument("--backend", default="pycocotools", choices=["pycocotools", "faster"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-actors", type=int)
    p.add_argument("--min-actors", type=int, default=1)
    p.add_argument("--max-actors", type=int)
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--cpu-threads", type=int)
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region")
    p.add_argument("--progress-interval-s", type=float, default=10.0)
    p.add_argument("--ray-address", help="Ray cluster to join (default: the running one, else start a local one; "
                                         "'local' always starts a new local one)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray started by this job (default >= 4)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of setting errors")
    return p


def _record_failure(cfg, error: BaseException) -> None:
    """PaddleX's failure record in OUT/evaluate_result.json (best effort: the error is what matters)."""
    from pipelines.evaluate import RESULT_FILE
    from pipelines.sinks import write_json
    from pipelines.storage import join

    try:
        write_json(join(cfg.output, RESULT_FILE),
                   {"done_flag": False, "err_type": type(error).__name__, "err_msg": str(error)}, cfg.s3())
    except Exception:  # noqa: BLE001
        logging.getLogger("instseg").exception("cannot write %s", RESULT_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if not args.model_name and not args.model_dir:
        print("error: give --model NAME or --model-dir DIR", file=sys.stderr)
        return 2

    from pipelines.batch_predict import JobSettingsError
    from pipelines.evaluate import EvaluateConfig, LabelMismatchError, evaluate_with_ray, prepare_evaluation

    cfg = EvaluateConfig(
        dataset_dir=args.dataset_dir, output=args.output, model_name=args.model_name, model_dir=args.model_dir,
        split=args.split, batch_size=args.batch_size, threshold=args.threshold, device=args.device,
        num_actors=args.num_actors, min_actors=args.min_actors, max_actors=args.max_actors,
        num_gpus_per_actor=args.num_gpus_per_actor, num_cpus_per_actor=args.num_cpus_per_actor,
        cpu_threads=args.cpu_threads, backend=args.backend, s3_endpoint=args.s3_endpoint, s3_region=args.s3_region,
        progress_interval_s=args.progress_interval_s)
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
