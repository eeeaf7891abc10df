"""Entry point: Label Studio tasks (with the predictions) from an existing batch job output.

    python -m jobs.label_studio OUTPUT [--out DIR] [--format brush|polygon] [--local-files-root DIR]
        [--min-score S] [--max-tasks-per-file N]

Writes the files `python -m jobs.batch_predict ... --label-studio` writes: OUT/tasks.json (or
tasks-<k>-<j>.json when one file would be too large to import) and OUT/config.xml, by default
under OUTPUT/label_studio/. OUTPUT is a local directory or an s3:// prefix. With more than 16
shards of parts the files are written by Ray tasks (a running cluster, else a local Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from instseg_core.io import S3Options, is_remote, join, storage_error_message
from jobs._common import add_ray_flags, connect_ray, fail, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.label_studio", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="the batch job's --output (local directory or s3:// prefix)")
    p.add_argument("--out", help="where to write (default OUTPUT/label_studio)")
    p.add_argument("--format", choices=("brush", "polygon"), default="brush",
                   help="regions as brush masks (default; holes and parts kept) or polygons")
    p.add_argument("--local-files-root", default="/", metavar="DIR",
                   help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: local images become /data/local-files/?d=<path "
                        "below DIR> (default /)")
    p.add_argument("--min-score", type=float, default=0.0, help="leave out instances scoring below this")
    p.add_argument("--max-tasks-per-file", type=int, help="tasks per file (default 10000)")
    p.add_argument("--s3-endpoint")
    add_ray_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    from pipelines.label_studio import LABEL_STUDIO_DIR, MAX_TASKS_PER_FILE, LabelStudioOptions, convert_output
    from pipelines.sinks import list_parts, parts_by_shard

    output = args.output if is_remote(args.output) else os.path.abspath(args.output)
    out_dir = args.out or join(output, LABEL_STUDIO_DIR)
    out_dir = out_dir if is_remote(out_dir) else os.path.abspath(out_dir)
    if not is_remote(output) and not os.path.isdir(output):
        fail(f"{args.output} is not a directory")
    s3 = S3Options.from_env(args.s3_endpoint)
    try:
        options = LabelStudioOptions(kind=args.format, local_files_root=os.path.abspath(args.local_files_root),
                                     min_score=args.min_score, model_version=_run_id(output, s3),
                                     max_tasks_per_file=args.max_tasks_per_file or MAX_TASKS_PER_FILE)
        groups = -(-len(parts_by_shard(list_parts(output, s3))) // 16)
        if groups > 1:
            connect_ray(args.ray_address, args.num_cpus)
        result = convert_output(output, out_dir, options, s3=s3, use_ray=groups > 1)
    except ValueError as e:  # not a job output (OutputError), a bad value, an image outside the files root
        if args.debug:
            raise
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - storage errors a user can fix become one line
        message = storage_error_message(output, e)
        if message is None or args.debug:
            raise
        fail(message)
    print(json.dumps({"out": out_dir, **result}, indent=2))
    return 0


def _run_id(output: str, s3: S3Options) -> str:
    """The run id in the output's summary.json (the predictions' model_version when a row has none)."""
    from instseg_core.io import open_uri

    try:
        with open_uri(join(output, "summary.json"), "rb", s3) as f:
            return str(json.load(f).get("run_id") or "")
    except (OSError, ValueError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
