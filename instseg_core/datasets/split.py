"""Re-split a COCO instance-segmentation dataset into train/val (PaddleX ``CheckDataset.split``).

Layout: ``<root>/annotations/instance_train.json`` and ``instance_val.json`` (``<root>`` is the
dataset root itself; finding it under a larger tree is the caller's job).

Behaviour (PaddleX 3.x ``split_dataset.py`` contract, spec section 4.6) and the deliberate
differences from it:

* ``train_percent + val_percent`` must equal 100 and both must be > 0; the error names the values.
* The images of both files are merged. PaddleX always adds the largest image id of the train file to
  every val id; here the val ids are shifted only when the two id sets collide, and then by
  ``max(train ids) + 1 - min(val ids)`` (which equals PaddleX's offset for ids starting at 1 and,
  unlike it, cannot collide when ids start at 0). Annotation ``image_id`` values follow their image.
* Categories are merged by id; one id with two different names is an error (PaddleX silently keeps
  one). The merged list is sorted by id.
* The shuffle uses ``random.Random(seed)``, so a split is reproducible (PaddleX is unseeded).
  Train gets ``round(n * train_percent / 100)`` images (Python rounding, as PaddleX), val the rest,
  so no image is ever lost to rounding.
* The original files are renamed to ``*.json.bak`` (``.bak.1``, ``.bak.2``... when taken), never
  deleted; new files are written to a temporary name first and then moved into place.
* Annotation ids are renumbered from 1 in each file; every other annotation field (crowd RLE
  segmentations included) is kept verbatim. Annotations whose image is absent from their file are
  dropped and counted. Key order is ``categories, images, annotations``; ``info``/``licenses`` (if
  present) are kept after them.
* Either input file may be missing (e.g. to split a single ``instance_train.json``); at least one
  must exist.
"""

from __future__ import annotations

import json
import os
import random
from numbers import Real
from pathlib import Path
from typing import Any, Sequence, TypeVar

from instseg_core.datasets.check import DatasetError
from instseg_core.datasets.layout import layout_hint
from instseg_core.io import atomic_write

__all__ = ["SplitError", "split_coco_dataset", "backup_existing", "seeded_cut", "write_json_replacing",
           "write_replacing"]

SPLITS = ("train", "val")
T = TypeVar("T")


class SplitError(DatasetError, ValueError):
    """Bad split request or inconsistent input annotations.

    A :class:`DatasetError` (the package's fatal dataset problem) and, for plain callers, a ``ValueError``.
    """


def backup_existing(path: Path) -> Path | None:
    """Rename ``path`` to ``path.bak`` (or the first free ``path.bak.N``); return the new path.

    Returns ``None`` when ``path`` does not exist. Nothing is ever deleted or overwritten.
    """
    path = Path(path)
    if not path.exists():
        return None
    candidate = path.with_name(path.name + ".bak")
    n = 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.bak.{n}")
    os.rename(path, candidate)
    return candidate


def seeded_cut(items: Sequence[T], seed: int, train_ratio: float) -> tuple[list[T], list[T]]:
    """Shuffle ``items`` with ``random.Random(seed)``; the first ``int(train_ratio * n)`` (at least one
    when there are items) go to train, the rest to val. Used by the converters' automatic 80/20 split."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_train = max(1, int(train_ratio * len(shuffled))) if shuffled else 0
    return shuffled[:n_train], shuffled[n_train:]


def write_replacing(path: Path, data: bytes) -> Path | None:
    """Write ``data`` to ``path`` all at once; an existing file is first backed up (only once the new
    content is complete, so a failure leaves the old file where it was).

    Returns the backup path (``None`` when there was nothing to back up).
    """
    backups: list[Path | None] = []

    def publish(tmp: Path, target: Path) -> None:
        backups.append(backup_existing(target))
        os.replace(tmp, target)

    atomic_write(path, lambda f: f.write(data), publish=publish)
    return backups[0]


def write_json_replacing(path: Path, obj: Any) -> Path | None:
    """Write ``obj`` as compact UTF-8 JSON to ``path`` with :func:`write_replacing`; returns the backup path."""
    return write_replacing(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _load_coco(path: Path) -> dict[str, Any]:
    """An annotation file with the structure the split relies on; any problem is a :class:`SplitError`
    naming the file and the entry."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SplitError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise SplitError(f"{path}: not UTF-8 text ({e}); re-save it as UTF-8 JSON") from e
    except OSError as e:
        raise SplitError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise SplitError(f"{path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise SplitError(f"{path}: '{key}' must be a list")
        for i, entry in enumerate(data.get(key, [])):
            if not isinstance(entry, dict):
                raise SplitError(f"{path}: {key}[{i}] is not a JSON object")
    ids = [img.get("id") for img in data.get("images", [])]
    if not all(_is_int(i) for i in ids):
        raise SplitError(f"{path}: every image needs an integer 'id'")
    if len(set(ids)) != len(ids):
        raise SplitError(f"{path}: duplicate image ids")
    for i, ann in enumerate(data.get("annotations", [])):
        if not _is_int(ann.get("image_id")):
            raise SplitError(f"{path}: annotations[{i}] has no integer 'image_id'")
    for i, cat in enumerate(data.get("categories", [])):
        if not _is_int(cat.get("id")):
            raise SplitError(f"{path}: categories[{i}] has no integer 'id'")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_percents(train_percent: Any, val_percent: Any) -> None:
    def ok(v: Any) -> bool:
        return isinstance(v, Real) and not isinstance(v, bool)

    if not (ok(train_percent) and ok(val_percent)):
        raise SplitError(f"train_percent ({train_percent!r}) and val_percent ({val_percent!r}) must be numbers")
    if train_percent <= 0 or val_percent <= 0:
        raise SplitError(f"train_percent ({train_percent}) and val_percent ({val_percent}) must both be > 0")
    if abs(train_percent + val_percent - 100) > 1e-9:
        raise SplitError(f"The sum of train_percent ({train_percent}) and val_percent ({val_percent}) should equal 100")


def split_coco_dataset(dataset_dir: str | os.PathLike, train_percent: int, val_percent: int, *,
                       seed: int = 0) -> dict[str, Any]:
    """Merge ``instance_train.json``/``instance_val.json`` under ``<dataset_dir>/annotations`` and re-split.

    Returns stats: ``{"train": {"images", "annotations"}, "val": {...}, "num_images",
    "num_annotations", "num_categories", "val_id_offset", "dropped_annotations", "backups",
    "outputs", "warnings", "seed"}``. Raises :class:`SplitError` on bad percents or inputs.
    """
    _check_percents(train_percent, val_percent)
    ann_dir = Path(dataset_dir) / "annotations"
    paths = {s: ann_dir / f"instance_{s}.json" for s in SPLITS}
    present = [s for s in SPLITS if paths[s].is_file()]
    if not present:
        hint = layout_hint(dataset_dir)
        raise SplitError(f"neither {paths['train']} nor {paths['val']} exists" + (f"; {hint}" if hint else ""))
    data = {s: _load_coco(paths[s]) for s in present}
    warnings: list[str] = [f"{paths[s]} not found; splitting the other file alone" for s in SPLITS if s not in present]

    # --- categories: merge by id, refuse conflicting names ---
    categories: dict[Any, dict[str, Any]] = {}
    for s in present:
        for cat in data[s].get("categories", []):
            cid = cat.get("id")
            if cid in categories and categories[cid].get("name") != cat.get("name"):
                raise SplitError(f"category id {cid} is named {categories[cid].get('name')!r} in one file "
                                 f"and {cat.get('name')!r} in {paths[s]}")
            categories.setdefault(cid, cat)
    merged_categories = [categories[k] for k in sorted(categories)]

    # --- images: make ids unique, carry each image's annotations along ---
    images: list[dict[str, Any]] = []
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    used_ids: set[int] = set()
    offset = 0
    dropped = 0
    for s in present:
        imgs = data[s].get("images", [])
        ids = {img["id"] for img in imgs}
        shift = 0
        if ids & used_ids:  # only shift on an actual collision, keeping ids stable otherwise
            shift = max(used_ids) + 1 - min(ids)
            offset = shift
        for img in imgs:
            new = dict(img)
            new["id"] = img["id"] + shift
            images.append(new)
            anns_by_image[new["id"]] = []
        used_ids |= {i + shift for i in ids}
        for ann in data[s].get("annotations", []):
            if ann.get("image_id") not in ids:
                dropped += 1
                continue
            new_ann = dict(ann)
            new_ann["image_id"] = ann["image_id"] + shift
            anns_by_image[new_ann["image_id"]].append(new_ann)
    if dropped:
        warnings.append(f"dropped {dropped} annotation(s) whose image_id is not in their file")
    names = [img.get("file_name") for img in images]
    dup_names = sorted({n for n in names if names.count(n) > 1 and n is not None})
    if dup_names:
        warnings.append(f"{len(dup_names)} file_name(s) listed more than once, e.g. {dup_names[0]!r}")

    # --- shuffle and cut ---
    random.Random(seed).shuffle(images)
    n = len(images)
    n_train = round(n * train_percent / 100)
    parts = {"train": images[:n_train], "val": images[n_train:]}

    extras = {k: v for s in present for k, v in data[s].items()
              if k not in ("categories", "images", "annotations")}
    stats: dict[str, Any] = {"seed": seed, "num_images": n, "num_categories": len(merged_categories),
                             "val_id_offset": offset, "dropped_annotations": dropped,
                             "backups": [], "outputs": [], "warnings": warnings}
    total_anns = 0
    for s in SPLITS:
        anns: list[dict[str, Any]] = []
        for img in parts[s]:
            for ann in anns_by_image[img["id"]]:
                # Renumber ids per file; everything else (crowd RLE included) stays as it was.
                anns.append({**ann, "id": len(anns) + 1})
        if not parts[s]:
            warnings.append(f"the {s} split is empty ({n} image(s) in total)")
        out = {"categories": merged_categories, "images": parts[s], "annotations": anns, **extras}
        backup = write_json_replacing(paths[s], out)
        if backup is not None:
            stats["backups"].append(str(backup))
        stats["outputs"].append(str(paths[s]))
        stats[s] = {"images": len(parts[s]), "annotations": len(anns)}
        total_anns += len(anns)
    stats["num_annotations"] = total_anns
    return stats
