"""Export one network of each family with the oracle-rule weights (``../shared/oracles``), for the
memory and speed benchmarks: PP-YOLOE_seg-S and Mask-RT-DETR-S at 640x640, MaskRCNN-ResNet50-FPN
and SOLOv2 with their official 800x1333 keep-ratio preprocessing.

``--repo`` exports with another checkout's code (e.g. a ``git worktree`` of an older commit, for a
before/after comparison); ``--score-floor none`` keeps every detection the model's own rule keeps
(the oracle-rule weights score low: PP-YOLOE_seg's detections are mostly below the default 0.05).

    .venv/bin/python bench/export_families.py OUT_DIR [--repo PATH] [--score-floor none|0.05] [--models ...]
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

FAMILIES = ["PP-YOLOE_seg-S", "Mask-RT-DETR-S", "MaskRCNN-ResNet50-FPN", "SOLOv2"]
THRESHOLD = {"PP-YOLOE_seg-S": 0.02}  # draw_threshold: keep a few of the oracle-rule weights' detections


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--score-floor", default="none")
    p.add_argument("--models", nargs="*", default=FAMILIES)
    args = p.parse_args()
    repo = Path(args.repo).resolve()
    sys.path[:0] = [str(repo), str(repo / "tests")]
    from oracle_utils import oracle_model

    from instseg_core.export import export_model

    kwargs = {}
    if "score_floor" in inspect.signature(export_model).parameters:
        kwargs["score_floor"] = None if args.score_floor == "none" else float(args.score_floor)
    for name in args.models:
        out = Path(args.out) / name
        export_model(oracle_model(name), None, out, input_size=640 if name in FAMILIES[:2] else None,
                     draw_threshold=THRESHOLD.get(name, 0.3), **kwargs)
        print(f"{name} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
