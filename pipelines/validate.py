"""Distributed dataset validation: ``check_dataset`` for datasets too big for one machine.

The JSON-level checks, demo images and histogram run on the driver (annotations are small next to
images); the per-image checks (exists, decodes fully, declared size) are spread over the Ray
cluster as tasks. The dataset may be local (a path every node can read) or on S3. The result file
is the same ``check_dataset_result.json`` that ``instseg run ... Global.mode=check_dataset`` writes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from instseg_core.datasets.check import Problem, check_dataset, check_image
from instseg_core.datasets.coco import ANNOTATION_FILES
from instseg_core.io import S3Options, fsspec_fs, is_remote, join, redact

log = logging.getLogger("instseg")

def find_remote_root(dataset_uri: str, s3: S3Options | None = None) -> str:
    """The dataset root on an object store: the folder holding ``images/`` and ``annotations/``.

    Looks at the URI itself and its direct children first (two listings, however many images
    there are); only then walks the whole prefix, as PaddleX's ``**/images`` rule does.
    """
    from instseg_core.datasets.coco import DatasetError

    fs = fsspec_fs(dataset_uri, s3)
    fs.invalidate_cache()
    base = dataset_uri.rstrip("/")
    scheme = base.split("://", 1)[0] + "://"

    def has_images(path: str) -> bool:
        return fs.isdir(f"{path}/images")

    if has_images(base):
        return base
    children = [scheme + c.removeprefix(scheme) for c in fs.ls(base, detail=False)] if fs.isdir(base) else []
    candidates = [c for c in children if has_images(c)]
    if not candidates:
        candidates = sorted({scheme + p.rsplit("/images/", 1)[0].removeprefix(scheme)
                             for p in fs.find(base) if "/images/" in p})
    if len(candidates) != 1:
        raise DatasetError(f"expected exactly one 'images' folder under {redact(dataset_uri)}, found "
                           f"{len(candidates)}: {[redact(c) for c in candidates[:5]]}")
    return candidates[0]


def _check_batch(batch: pa.Table, s3: S3Options) -> pa.Table:
    """Ray task: check each image of the batch; problems come back as rows (ids as JSON)."""
    out: dict[str, list] = {"kind": [], "level": [], "split": [], "message": [], "ids": []}
    for rec in batch.to_pylist():
        ids = {"image_id": rec["image_id"], "file_name": rec["file_name"]}
        declared = (rec["width"], rec["height"]) if rec["width"] is not None and rec["height"] is not None else None
        uri = rec["uri"]
        if is_remote(uri):
            try:
                data = fsspec_fs(uri, s3).cat_file(uri)
            except FileNotFoundError:
                problems = [Problem.of("image_missing", rec["split"], f"image file {redact(uri)!r} not found", **ids)]
            else:
                problems = check_image(data, declared, split=rec["split"], ids=ids, name=redact(uri))
        else:
            problems = check_image(uri, declared, split=rec["split"], ids=ids)
        for p in problems:
            out["kind"].append(p.kind)
            out["level"].append(p.level)
            out["split"].append(p.split)
            out["message"].append(p.message)
            out["ids"].append(json.dumps(p.ids, default=str))
    return pa.table({k: pa.array(v, pa.string()) for k, v in out.items()})


def ray_file_checker(image_root: str, s3: S3Options, batch_size: int = 64):
    """A ``file_checker`` for :func:`check_dataset` that checks every image on the Ray cluster."""
    import ray

    def check(images: list[dict[str, Any]], split: str) -> list[Problem]:
        if not images:
            return []
        rows = pa.table({
            "split": [split] * len(images),
            "image_id": [int(img["id"]) for img in images],
            "file_name": [str(img["file_name"]) for img in images],
            "width": [img.get("width") if isinstance(img.get("width"), int) else None for img in images],
            "height": [img.get("height") if isinstance(img.get("height"), int) else None for img in images],
            "uri": [join(image_root, str(img["file_name"])) for img in images],
        })
        blocks = [rows.slice(i, batch_size) for i in range(0, rows.num_rows, batch_size)]
        ds = ray.data.from_arrow(blocks).map_batches(_check_batch, batch_size=batch_size, batch_format="pyarrow",
                                                     fn_kwargs={"s3": s3})
        problems = []
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for r in batch.to_pylist():
                problems.append(Problem(r["kind"], r["level"], r["split"], r["message"], json.loads(r["ids"])))
        log.info("checked %d %s images on the cluster: %d problem(s)", len(images), split, len(problems))
        return problems

    return check


def _mirror_for_driver(root: str, local: Path, sample_num: int, s3: S3Options) -> Path:
    """Copy what the driver needs from a remote dataset: both annotation files and the first
    ``sample_num`` images of each split (for the demo drawings). Returns the local root."""
    fs = fsspec_fs(root, s3)
    name = root.rstrip("/").rsplit("/", 1)[-1]
    local_root = local / name
    (local_root / "annotations").mkdir(parents=True)
    (local_root / "images").mkdir()
    annotation_files = [f"annotations/{name}" for name in ANNOTATION_FILES.values()]
    for rel in annotation_files:
        try:
            fs.get(join(root, rel), str(local_root / rel))
        except FileNotFoundError:
            pass  # check_dataset reports the missing file with PaddleX's message
    for rel in annotation_files:
        path = local_root / rel
        if not path.is_file():
            continue
        try:
            images = json.loads(path.read_text()).get("images") or []
        except (ValueError, AttributeError):
            continue  # check_dataset reports the corrupt file
        for img in images[:sample_num]:
            fname = str(img.get("file_name", "")) if isinstance(img, dict) else ""
            target = (local_root / "images" / fname).resolve()
            if not fname or not str(target).startswith(str((local_root / "images").resolve())):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get(join(root, "images", fname), str(target))
            except FileNotFoundError:
                pass  # reported by the cluster check as image_missing
    return local_root


def validate_dataset(dataset: str, output_dir: str, *, sample_num: int = 10, max_examples: int = 20,
                     batch_size: int = 64, s3: S3Options | None = None) -> dict[str, Any]:
    """Check a dataset (local path or ``s3://`` URI) with the image checks on Ray; writes the
    result files into the local ``output_dir`` and returns the result dict."""
    from instseg_core.datasets.coco import find_dataset_root

    s3 = s3 or S3Options.from_env()
    if is_remote(dataset):
        root = find_remote_root(dataset, s3)
        with tempfile.TemporaryDirectory(prefix="instseg-validate-") as tmp:
            local_root = _mirror_for_driver(root, Path(tmp), sample_num, s3)
            return check_dataset(local_root, output_dir, sample_num=sample_num, max_examples=max_examples,
                                 file_checker=ray_file_checker(join(root, "images"), s3, batch_size))
    local_root = find_dataset_root(dataset)
    return check_dataset(local_root, output_dir, sample_num=sample_num, max_examples=max_examples,
                         file_checker=ray_file_checker(os.path.abspath(local_root / "images"), s3, batch_size))
