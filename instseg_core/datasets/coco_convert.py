"""Convert the standard COCO layout to PaddleX's (``CheckDataset.convert.src_dataset_type=COCO``).

Input (as downloaded from cocodataset.org, or any dataset laid out the same way)::

    <root>/annotations/instances_train2017.json    optional if the val file is there
    <root>/annotations/instances_val2017.json      optional if the train file is there
    <root>/train2017/*.jpg, <root>/val2017/*.jpg   (or <root>/images/train2017/...)

Any ``instances_<name>.json`` whose ``<name>`` starts with ``train``/``val`` and has a ``<name>/``
(or ``images/<name>/``) photo folder is used; others (e.g. ``instances_val2017_mini8.json``, which
has no folder) are left out with a note. Two candidates for one split is an error naming both.

Output, next to the input (which is never modified)::

    <root>/images/<name>/<file_name>               hard links to the photos (copies across file systems)
    <root>/annotations/instance_train.json
    <root>/annotations/instance_val.json

``file_name`` becomes ``<name>/<file_name>`` (photos already under ``images/<name>/`` are used in
place). Everything else is kept verbatim: image, annotation and category ids, crowd RLE, ``info``
and ``licenses``; the key order is ``categories, images, annotations`` as PaddleX's split writes.
When only one split exists, its images are shuffled with the seed and cut 80/20 (train gets at
least one), each annotation following its image. Existing outputs are renamed ``.bak``; a photo
target that already exists must be the same file (or the same bytes), otherwise nothing is written.
The deep checks (ids, polygons, sizes...) are :func:`instseg_core.datasets.check.check_dataset`'s job.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from instseg_core.datasets.coco import load_coco
from instseg_core.datasets.labelme import ConvertError
from instseg_core.datasets.layout import CocoSource, ImagePlacer, LayoutError, find_standard_coco
from instseg_core.datasets.split import seeded_cut, write_json_replacing

__all__ = ["convert_standard_coco"]

SPLITS = ("train", "val")
EXPECTED = ("expected annotations/instances_<name>.json with its photos in <name>/ or images/<name>/, <name> "
            "starting with train or val (e.g. annotations/instances_val2017.json + val2017/)")


def _sources(root: Path) -> tuple[dict[str, CocoSource], list[str]]:
    """At most one source per split; raises :class:`ConvertError` when there is none or two for a split."""
    found, notes = find_standard_coco(root)
    if not found:
        detail = f" ({'; '.join(notes)})" if notes else ""
        raise ConvertError(f"no standard COCO layout in {root}: {EXPECTED}{detail}")
    by_split: dict[str, CocoSource] = {}
    for src in found:
        if src.split in by_split:
            first = by_split[src.split].annotations.name
            raise ConvertError(f"two {src.split} splits in {root / 'annotations'}: {first} and {src.annotations.name}; "
                               "move one of them away")
        by_split[src.split] = src
    return by_split, notes


def _load(src: CocoSource) -> dict[str, Any]:
    """The annotation file, with the fields this conversion relies on checked (one clear error each) and
    at least one of its photos present."""
    data = load_coco(src.annotations)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise ConvertError(f"{src.annotations}: '{key}' must be a list")
    for i, img in enumerate(data.get("images", [])):
        if not (isinstance(img, dict) and isinstance(img.get("file_name"), str) and img["file_name"]):
            raise ConvertError(f"{src.annotations}: image #{i} has no usable 'file_name'")
        name = PurePosixPath(img["file_name"].replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts:
            raise ConvertError(f"{src.annotations}: image #{i} file_name {img['file_name']!r} leaves "
                               f"{src.image_dir}; it must be a path inside that folder")
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            raise ConvertError(f"{src.annotations}: annotation #{i} is not an object")
    images = data.get("images", [])
    if images and not any((src.image_dir / img["file_name"]).is_file() for img in images):
        raise ConvertError(f"none of the {len(images)} photos of {src.annotations.name} is in {src.image_dir} "
                           "(file_name is looked up there); nothing was written")
    return data


def _split_one(data: dict[str, Any], seed: int, train_ratio: float) -> dict[str, dict[str, Any]]:
    """Both splits from one file: images cut with the seed, annotations following their image."""
    train, val = seeded_cut(data.get("images", []), seed, train_ratio)
    out = {}
    for split, images in (("train", train), ("val", val)):
        ids = {img.get("id") for img in images}
        anns = [a for a in data.get("annotations", []) if a.get("image_id") in ids]
        out[split] = {**data, "images": images, "annotations": anns}
    return out


def _placed_images(src: CocoSource, images: list[dict[str, Any]], placer: ImagePlacer,
                   stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Image entries with ``file_name`` below ``images/``; missing photos are recorded as errors."""
    out = []
    for img in images:
        path = src.image_dir / img["file_name"]
        if path.is_file():
            try:
                name = placer.place(path)
            except LayoutError as e:
                raise ConvertError(str(e)) from None
        else:
            name = placer.file_name(path)
            if len(stats["errors"]) < 20:
                stats["errors"].append(f"{path}: photo of image {img.get('id')} not found")
            stats["missing_images"] += 1
        out.append({**img, "file_name": name})
    return out


def convert_standard_coco(dataset_dir: str | os.PathLike[str], *, seed: int = 0,
                          train_ratio: float = 0.8) -> dict[str, Any]:
    """Convert ``<dataset_dir>`` from the standard COCO layout to PaddleX's (see the module docstring).

    Returns stats: ``{"layout": "coco", "sources": {split: {"annotations", "images"}}, "split_from":
    split or None, "seed", "train": {"images", "annotations"}, "val": {...}, "num_classes",
    "images_linked", "images_copied", "missing_images", "errors": [str], "warnings": [str],
    "backups": [paths], "outputs": [paths]}``. Raises :class:`ConvertError` (naming the file or
    folder) when the layout is not found or ambiguous, an annotation file is unusable, no photo of
    a split is found, or an ``images/`` file is in the way; nothing is written then.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ConvertError(f"dataset directory {root} does not exist or is not a directory")
    if not 0.0 < train_ratio <= 1.0:
        raise ConvertError(f"train_ratio must be in (0, 1], got {train_ratio}")
    sources, notes = _sources(root)
    stats: dict[str, Any] = {
        "layout": "coco", "seed": seed, "split_from": None, "images_linked": 0, "images_copied": 0,
        "missing_images": 0, "errors": [], "warnings": list(notes), "backups": [], "outputs": [],
        "sources": {s: {"annotations": str(src.annotations), "images": str(src.image_dir)}
                    for s, src in sources.items()},
    }
    loaded = {split: _load(src) for split, src in sources.items()}
    if len(sources) == 1:
        (only,) = sources
        stats["split_from"] = only
        parts = _split_one(loaded[only], seed, train_ratio)
        src_of = {s: sources[only] for s in SPLITS}
        stats["warnings"].append(f"only a {only} split ({sources[only].annotations.name}): its images were split "
                                 f"{len(parts['train']['images'])}/{len(parts['val']['images'])} with seed {seed}")
    else:
        parts, src_of = loaded, sources

    placer = ImagePlacer(root, root / "images")
    outputs = {}
    for split in SPLITS:
        data = parts[split]
        images = _placed_images(src_of[split], data.get("images", []), placer, stats)
        extras = {k: v for k, v in data.items() if k not in ("categories", "images", "annotations")}
        outputs[split] = {"categories": data.get("categories", []), "images": images,
                          "annotations": data.get("annotations", []), **extras}

    placer.apply()
    stats["images_linked"], stats["images_copied"] = placer.linked, placer.copied
    for split in SPLITS:
        out = root / "annotations" / f"instance_{split}.json"
        backup = write_json_replacing(out, outputs[split])
        if backup is not None:
            stats["backups"].append(str(backup))
        stats["outputs"].append(str(out))
        stats[split] = {"images": len(outputs[split]["images"]), "annotations": len(outputs[split]["annotations"])}
    stats["num_classes"] = len(outputs["val"]["categories"])
    if stats["missing_images"]:
        stats["warnings"].append(f"{stats['missing_images']} photo(s) listed in the annotations are missing "
                                 "(kept: the check reports them as image_missing)")
    return stats
