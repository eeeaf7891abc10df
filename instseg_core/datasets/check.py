"""Checking a COCO instance-segmentation dataset in PaddleX's layout (``COCOInstSegDataset``).

:func:`check_dataset` writes what PaddleX's dataset checker writes:

* ``<output_dir>/check_dataset_result.json``: PaddleX's keys (``done_flag``, ``check_pass``,
  ``attributes``, ``analysis``, ``dataset_path``, ``show_type``, ``dataset_type``) plus
  ``deep_check``, the summary of the deeper checks
  (:mod:`instseg_core.datasets.problems`: what each kind of problem means);
* ``<output_dir>/check_dataset/demo_img/<file_name>``: sample images with masks, boxes and
  category names drawn (:mod:`instseg_core.datasets.demo`);
* ``<output_dir>/check_dataset/histogram.png``: annotations per category, train vs val.

As in PaddleX, ``num_classes`` counts the **val** file's category ids and ``train_samples`` /
``val_samples`` count **annotations**, not images. On a fatal error (:class:`DatasetError`: no or
several ``images`` directories, missing or unparsable annotation file) the result file holds
``{"done_flag": false, "err_type", "err_msg"}`` and the error is re-raised.

Deliberate differences from PaddleX:

* Up to ``sample_num`` images are drawn from **each** split (PaddleX reuses one counter, so val
  gets fewer samples than asked when train has fewer images than ``sample_num``).
* A missing or broken image is reported as a problem instead of aborting the whole check.
* Standard JSON (``json``, indent 2): ``/`` is not escaped as ``\\/`` as ujson does.
* Demo images are drawn by :func:`instseg_core.visualize.draw_annotations` in PaddleX's checker
  look, with the differences listed there (masks under the labels, so the labels stay readable;
  box lines at least 1 px; Pillow's default font).
* ``check_pass`` is false as soon as a deeper check finds an error-level problem (PaddleX only
  validates that the files exist and load).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from instseg_core.datasets.coco import (
    DatasetError,
    annotation_path,
    find_dataset_root,
    is_id,
    is_positive_int,
    load_coco,
)
from instseg_core.datasets.demo import write_demo_images
from instseg_core.datasets.histogram import category_counts, draw_histogram
from instseg_core.datasets.problems import (
    Problem,
    category_names,
    check_annotations,
    check_image,
    summarize_problems,
)

logger = logging.getLogger(__name__)

RESULT_FILE = "check_dataset_result.json"
HISTOGRAM_FILE = "check_dataset/histogram.png"


def summary_lines(result: dict[str, Any], examples: int = 2) -> list[str]:
    """A short human summary of a ``check_dataset`` result: the verdict, then each problem kind
    (errors first) with its count and the first ``examples`` messages."""
    deep = result.get("deep_check") or {}
    verdict = "passed" if result.get("check_pass") else "FAILED"
    lines = [f"dataset check {verdict}: {deep.get('error_count', 0)} error(s), "
             f"{deep.get('warning_count', 0)} warning(s)"]
    for kind, entry in (deep.get("by_kind") or {}).items():
        shown = "; ".join(f"{e['split']}: {e['message']}" for e in entry["examples"][:examples])
        lines.append(f"  {entry['level']} {kind} x{entry['count']}: {shown}")
    return lines


# ---------------------------------------------------------------------------------------------
# the whole dataset


def _usable_images(coco: dict[str, Any]) -> list[dict[str, Any]]:
    """Image entries complete enough to be located and checked (first entry wins on a duplicate id)."""
    images = coco.get("images")
    out, seen = [], set()
    for img in images if isinstance(images, list) else []:
        if isinstance(img, dict) and is_id(img.get("id")) and isinstance(img.get("file_name"), str) \
                and img["file_name"] and img["id"] not in seen:
            seen.add(img["id"])
            out.append(img)
    return out


def _declared_wh(img: dict[str, Any]) -> tuple[int, int] | None:
    w, h = img.get("width"), img.get("height")
    return (int(w), int(h)) if is_positive_int(w) and is_positive_int(h) else None


def _check_files(images: list[dict[str, Any]], image_dir: Path, split: str) -> list[Problem]:
    def one(img: dict[str, Any]) -> list[Problem]:
        return check_image(image_dir / img["file_name"], _declared_wh(img), split=split,
                           ids={"image_id": img["id"], "file_name": img["file_name"]})

    if len(images) < 4:
        return [p for img in images for p in one(img)]
    # cv2 and PIL release the GIL while decoding; map() keeps the report order stable.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return [p for found in pool.map(one, images) for p in found]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


FileChecker = Callable[[list[dict[str, Any]], str], list[Problem]]


def check_dataset(dataset_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], *, sample_num: int = 10,
                  max_examples: int = 20, check_images: bool = True,
                  file_checker: FileChecker | None = None) -> dict[str, Any]:
    """Check a PaddleX-layout COCO instance-segmentation dataset and write the report files.

    Returns the dict written to ``<output_dir>/check_dataset_result.json`` (see the module
    docstring). ``check_images=False`` reads only the sampled images instead of every image.
    ``file_checker(images, split)`` replaces the local, threaded check of every image file (the
    distributed validator passes one that spreads the decode checks over a Ray cluster).
    Never writes inside the dataset. Raises :class:`DatasetError` on fatal problems, after
    writing a ``done_flag: false`` result.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _check_dataset(Path(dataset_dir), out, sample_num, max_examples, check_images, file_checker)
    except Exception as e:  # as PaddleX: any failure still leaves a result file
        _write_json(out / RESULT_FILE, {"done_flag": False, "err_type": str(type(e)), "err_msg": str(e)})
        raise


def _check_dataset(dataset_dir: Path, out: Path, sample_num: int, max_examples: int,
                   check_images: bool, file_checker: FileChecker | None = None) -> dict[str, Any]:
    root = find_dataset_root(dataset_dir)
    image_dir = root / "images"
    data = {split: load_coco(annotation_path(root, split)) for split in ("train", "val")}
    problems = check_annotations(data["train"], data["val"])

    cat_names = {**category_names(data["val"]), **category_names(data["train"])}
    sample_paths: dict[str, list[str]] = {}
    for split, coco in data.items():
        images = _usable_images(coco)
        samples = images[:max(0, sample_num)]
        if file_checker is not None:
            file_problems = file_checker(images, split)
        else:
            file_problems = _check_files(images if check_images else samples, image_dir, split)
        problems.extend(file_problems)
        unreadable = {p.ids["image_id"] for p in file_problems if p.kind in ("image_missing", "image_undecodable")}
        if len(images) < sample_num:
            logger.info("Only %d images in %s", len(images), annotation_path(root, split).name)
        anns_by_image: dict[Any, list[dict]] = defaultdict(list)
        anns = coco.get("annotations")
        for ann in anns if isinstance(anns, list) else []:
            if isinstance(ann, dict) and is_id(ann.get("image_id")):
                anns_by_image[ann["image_id"]].append(ann)
        sample_paths[split] = write_demo_images([img for img in samples if img["id"] not in unreadable],
                                                anns_by_image, cat_names, image_dir, out)

    (out / HISTOGRAM_FILE).parent.mkdir(parents=True, exist_ok=True)
    draw_histogram(category_counts(data["train"], data["val"]), out / HISTOGRAM_FILE)

    summary = summarize_problems(problems, max_examples)
    n_anns = {s: len(c["annotations"]) if isinstance(c.get("annotations"), list) else 0 for s, c in data.items()}
    result = {
        "done_flag": True,
        "check_pass": summary["error_count"] == 0,
        "attributes": {
            "num_classes": len(category_names(data["val"])),
            "train_samples": n_anns["train"],
            "train_sample_paths": sample_paths["train"],
            "val_samples": n_anns["val"],
            "val_sample_paths": sample_paths["val"],
        },
        "analysis": {"histogram": HISTOGRAM_FILE},
        "dataset_path": root.name,
        "show_type": "image",
        "dataset_type": "COCOInstSegDataset",
        "deep_check": summary,
    }
    _write_json(out / RESULT_FILE, result)
    return result


# DatasetError, Problem and check_image are re-exported: callers of check_dataset handle them too.
__all__ = ["DatasetError", "Problem", "check_dataset", "check_image", "summary_lines"]
