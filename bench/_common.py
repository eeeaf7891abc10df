"""Shared by the benchmarks: the repo path and the images they run on."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# test scaffolding some benchmarks reuse (tiny_models: stand-in model dirs); after the repo, so it shadows nothing
if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))


def image_pool() -> list[Path]:
    """The 80 COCO val2017 photos from ../shared when present, else the bundled samples."""
    coco = REPO.parent / "shared" / "data" / "coco_tiny_val2017" / "val2017"
    pool = sorted(coco.glob("*.jpg")) if coco.is_dir() else []
    return pool or sorted((REPO / "samples").glob("*.jpg"))
