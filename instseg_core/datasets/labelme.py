"""Convert a LabelMe-annotated dataset to COCO instance segmentation (PaddleX ``CheckDataset.convert``).

Input layout (PaddleX 3.x, spec section 4.5)::

    <root>/images/*                 photos
    <root>/annotations/*.json       LabelMe files
    <root>/train_anno_list.txt      required; one LabelMe path (relative to <root>) per line
    <root>/val_anno_list.txt        optional

Output: ``<root>/annotations/instance_train.json`` and ``instance_val.json`` (compact UTF-8 JSON, key
order ``images, categories, annotations``). Images are ``{id, file_name, width, height}``;
annotations ``{id, image_id, category_id, segmentation, area, bbox, iscrowd: 0}`` with
``segmentation`` a list of flat ``[x1, y1, x2, y2, ...]`` polygons and ``area``/``bbox`` taken from
the RLE of the rasterised instance (polygons filled with PIL, outline included, as PaddleX does).
Category ids start at 1 in first-seen order (train list first) and image ids are unique across both
files (both as PaddleX); annotation ids restart at 1 in each file.

Same as PaddleX: a missing ``val_anno_list.txt`` makes the converter move ``train_anno_list.txt``
to ``train_anno_list.txt.bak`` and write a shuffled 80/20 split into the two list files; a list
line's JSON path is its last space-separated token.

Improvements over PaddleX (which only accepts single polygons with more than 2 points):

* **Reproducible split**: the shuffle uses ``random.Random(seed)``; the ratio is configurable.
* **Multi-part instances**: shapes sharing a non-null ``group_id`` *and* the same label form one
  instance (one annotation with several polygons); PaddleX emits one annotation per shape.
* **``__ignore__``**: shapes labelled exactly ``__ignore__`` (LabelMe's convention) are skipped.
* **Shape types**: ``polygon`` (>= 3 points), ``rectangle`` (2 opposite corners -> 4-corner polygon;
  more points are treated as a polygon), ``circle`` (centre + a point on the circle -> a polygon of
  at least 32 vertices, more for big circles so edges stay <= ~4 px), ``mask`` (base64 PNG of the
  crop whose top-left corner is the first of the 2 bbox points, truncated to int). Masks are turned
  into polygons (outer contours, OpenCV) rather than stored as RLE, so every output annotation has
  the same polygon form PaddleX/PaddleDetection training expects for ``iscrowd: 0``; ``area`` and
  ``bbox`` still come from the exact mask. Holes inside a mask are lost in the polygons (not in
  ``area``). ``point``, ``line``, ``linestrip``, polygons with < 3 points and unknown types are
  skipped and counted in ``stats["skipped_shapes"]``. A missing ``shape_type`` (LabelMe 3) means
  polygon.
* **Embedded images**: when the image file is missing under ``images/`` but the JSON carries
  ``imageData`` (base64), the image is written there (name from ``imagePath``; the extension is the
  decoded format's when ``imagePath`` has no image extension). Existing files are never overwritten.
* **Image look-up**: ``imagePath`` (``/`` or ``\\`` separated; only the base name is used) that
  does not name a file under ``images/`` is looked up by stem (any image extension), then by the
  JSON file's stem. Unresolvable images are skipped and reported in ``stats["errors"]`` with the
  JSON path instead of producing an annotation file that points at nothing.
* **Size check**: ``imageHeight``/``imageWidth`` are compared with the real image (EXIF orientation
  applied, as LabelMe does); on a mismatch the real size is used and a warning recorded.
* **Both files list every category**, so ``num_classes`` does not depend on the split.
* **Safe writes**: everything is parsed and validated before any file is touched; replaced files
  are renamed to ``.bak`` (``.bak.1``, ``.bak.2``... when taken) and never deleted.
* **Clear errors**: a missing list file, a listed JSON that does not exist, or invalid JSON raise
  :class:`ConvertError` naming the file.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from instseg_core.datasets.check import DatasetError
from instseg_core.datasets.split import backup_existing, write_json_replacing

__all__ = ["ConvertError", "convert_labelme_to_coco", "IMAGE_EXTS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
IGNORE_LABEL = "__ignore__"
_FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "GIF": ".gif"}
SPLITS = ("train", "val")


class ConvertError(DatasetError, ValueError):
    """The LabelMe dataset cannot be converted (missing list, bad JSON, ...).

    A :class:`DatasetError` (the package's fatal dataset problem) and, for plain callers, a ``ValueError``.
    """


@dataclass
class _Instance:
    label: str
    polygons: list[list[float]] = field(default_factory=list)
    masks: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (x0, y0, crop)


@dataclass
class _Record:
    json_path: Path
    data: dict[str, Any]
    split: str


# ----------------------------------------------------------------------------- list files

def _read_list(path: Path, root: Path) -> list[str]:
    """Non-empty lines of a list file, each checked to name an existing LabelMe JSON."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [ln for ln in lines if ln]
    for i, line in enumerate(lines, 1):
        if not _json_of_line(line, root).is_file():
            raise ConvertError(f"{path}, line {i}: annotation file {_json_of_line(line, root)} does not exist")
    return lines


def _json_of_line(line: str, root: Path) -> Path:
    # PaddleX takes the last space-separated token; a whole line naming a file (path with spaces) wins.
    whole = root / line
    return whole if whole.is_file() else root / line.split(" ")[-1]


# ----------------------------------------------------------------------------- images

def _base_name(image_path: str) -> str:
    # LabelMe on Windows writes backslash paths such as "..\\images\\a.jpg"; PaddleX only splits on "/".
    return image_path.replace("\\", "/").split("/")[-1]


def _stem_index(images_dir: Path) -> dict[str, Path]:
    """Image files directly under ``images_dir`` by stem (first in sorted order wins)."""
    index: dict[str, Path] = {}
    if images_dir.is_dir():
        for p in sorted(images_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                index.setdefault(p.stem, p)
    return index


def _find_image(images_dir: Path, image_path: str, json_path: Path,
                index: dict[str, Path] | None) -> tuple[Path | None, dict[str, Path] | None]:
    """Resolve ``imagePath`` under ``images_dir``: exact base name, then its stem, then the JSON's stem.

    ``index`` is the lazily built stem index, returned so one listing serves the whole dataset.
    """
    name = _base_name(image_path)
    if name and (images_dir / name).is_file():
        return images_dir / name, index
    if index is None:
        index = _stem_index(images_dir)
    for stem in (Path(name).stem if name else None, json_path.stem):
        if stem and stem in index:
            return index[stem], index
    return None, index


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as LabelMe sees the image: EXIF rotations by 90/270 degrees swap the sides."""
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def _image_size(path: Path) -> tuple[int, int] | None:
    """Oriented (width, height) of an image file, or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            return _oriented_size(im)
    except Exception:  # any decoder failure just means "unreadable" here
        return None


def _decode_image_data(b64: Any) -> tuple[bytes, str, tuple[int, int]] | None:
    """Embedded ``imageData``: raw bytes, a file extension and oriented size; None if not an image."""
    try:
        raw = base64.b64decode(b64)
        with Image.open(io.BytesIO(raw)) as im:
            fmt, size = (im.format or "").upper(), _oriented_size(im)
    except Exception:  # bad base64, unknown format, decompression bomb...: treat as absent
        return None
    return raw, _FORMAT_EXT.get(fmt, "." + fmt.lower() if fmt else ".png"), size


# ----------------------------------------------------------------------------- shapes

def _circle_polygon(center: np.ndarray, edge: np.ndarray) -> list[float]:
    r = float(np.hypot(*(edge - center)))
    n = max(32, min(720, math.ceil(2 * math.pi * r / 4)))  # edges of at most ~4 px
    t = np.arange(n) * (2 * math.pi / n)
    pts = np.stack([center[0] + r * np.cos(t), center[1] + r * np.sin(t)], axis=1)
    return pts.reshape(-1).tolist()


def _decode_mask(b64: Any) -> np.ndarray | None:
    """Boolean crop from a mask shape's base64 PNG, or None when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            return np.asarray(im.convert("L")) > 0
    except Exception:  # counted as an invalid mask shape by the caller
        return None


def _mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a full-image mask as flat polygons; tiny blobs become their pixel box."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(float)
        if len(pts) < 3:  # 1-2 pixel blobs: a 2-point "polygon" would be read as a box by pycocotools
            x0, y0 = pts.min(axis=0)
            x1, y1 = pts.max(axis=0) + 1
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)
        polys.append(pts.reshape(-1).tolist())
    return polys


def _collect_instances(data: dict[str, Any], json_path: Path, stats: dict[str, Any]) -> list[_Instance]:
    """Group the shapes of one LabelMe file into instances (group_id + label), in first-seen order."""
    instances: dict[tuple, _Instance] = {}
    skipped: dict[str, int] = stats["skipped_shapes"]
    shapes = data.get("shapes") or []
    if not isinstance(shapes, list):
        raise ConvertError(f"{json_path}: 'shapes' must be a list")
    for idx, shape in enumerate(shapes):
        label = shape.get("label")
        if label == IGNORE_LABEL:
            stats["ignored_shapes"] += 1
            continue
        if not isinstance(label, str) or not label:
            skipped["no_label"] = skipped.get("no_label", 0) + 1
            continue
        stype = shape.get("shape_type") or "polygon"
        try:
            pts = np.asarray(shape.get("points") or [], dtype=float).reshape(-1, 2)
        except ValueError:
            raise ConvertError(f"{json_path}: shape {idx} ({label!r}) has malformed points") from None
        polygon: list[float] | None = None
        mask_part = None
        if stype == "polygon" or (stype == "rectangle" and len(pts) >= 3):
            polygon = pts.reshape(-1).tolist() if len(pts) >= 3 else None
        elif stype == "rectangle" and len(pts) == 2:
            (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
            polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
        elif stype == "circle" and len(pts) == 2:
            polygon = _circle_polygon(pts[0], pts[1])
        elif stype == "mask" and len(pts) == 2 and shape.get("mask"):
            crop = _decode_mask(shape["mask"])
            if crop is not None:
                mask_part = (int(pts[:, 0].min()), int(pts[:, 1].min()), crop)
        if polygon is None and mask_part is None:
            key_name = stype if stype in ("point", "points", "line", "linestrip") else f"invalid_{stype}"
            skipped[key_name] = skipped.get(key_name, 0) + 1
            continue
        gid = shape.get("group_id")
        key = (label, gid) if gid is not None else (label, None, idx)  # ungrouped shapes stay separate
        inst = instances.setdefault(key, _Instance(label))
        if polygon is not None:
            inst.polygons.append([float(v) for v in polygon])
        else:
            inst.masks.append(mask_part)
    return list(instances.values())


def _rasterise(inst: _Instance, width: int, height: int) -> tuple[np.ndarray, list[list[float]]]:
    """Dense union mask of an instance and its polygon list (mask parts turned into contours)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in inst.polygons:
        draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], outline=1, fill=1)
    dense = np.asarray(canvas, dtype=np.uint8).copy()
    polygons = list(inst.polygons)
    for x0, y0, crop in inst.masks:
        part = np.zeros((height, width), dtype=np.uint8)
        ys, xs = slice(max(y0, 0), min(y0 + crop.shape[0], height)), slice(max(x0, 0), min(x0 + crop.shape[1], width))
        if ys.start < ys.stop and xs.start < xs.stop:
            part[ys, xs] = crop[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        polygons.extend(_mask_polygons(part))
        dense |= part
    return dense, polygons


# ----------------------------------------------------------------------------- main entry

def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid LabelMe JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: not a LabelMe file (top level is not a JSON object)")
    return data


def _write_list(path: Path, lines: list[str]) -> Path | None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    backup = backup_existing(path)
    os.replace(tmp, path)
    return backup


def convert_labelme_to_coco(dataset_dir: str | os.PathLike, *, seed: int = 0,
                            train_ratio: float = 0.8) -> dict[str, Any]:
    """Convert ``<dataset_dir>`` (PaddleX LabelMe layout) to ``annotations/instance_{train,val}.json``.

    Returns stats: ``{"train": {"images", "annotations"}, "val": {...}, "categories": [names],
    "num_classes", "auto_split", "seed", "ignored_shapes", "skipped_shapes": {type: count},
    "images_written": [paths], "images_resolved": [{"json", "image_path", "found"}],
    "errors": [{"json", "error"}], "warnings": [str], "backups": [paths], "outputs": [paths]}``.
    Raises :class:`ConvertError` for a missing list file, a listed JSON that does not exist or
    that is not valid JSON. Nothing is modified when it raises.
    """
    root = Path(dataset_dir)
    if not 0.0 < train_ratio <= 1.0:
        raise ConvertError(f"train_ratio must be in (0, 1], got {train_ratio}")
    train_list, val_list = root / "train_anno_list.txt", root / "val_anno_list.txt"
    if not train_list.is_file():
        raise ConvertError(f"{train_list} not found: a LabelMe dataset needs train_anno_list.txt "
                           f"(and optionally val_anno_list.txt) listing annotation files relative to {root}")
    images_dir = root / "images"
    stats: dict[str, Any] = {
        "seed": seed, "auto_split": not val_list.is_file(), "ignored_shapes": 0, "skipped_shapes": {},
        "images_written": [], "images_resolved": [], "errors": [], "warnings": [], "backups": [],
        "outputs": [],
    }

    # 1. Read the lists (split in memory when val_anno_list.txt is missing).
    lines = {"train": _read_list(train_list, root)}
    if stats["auto_split"]:
        shuffled = list(lines["train"])
        random.Random(seed).shuffle(shuffled)
        n_train = int(train_ratio * len(shuffled))
        lines = {"train": shuffled[:n_train], "val": shuffled[n_train:]}
    else:
        lines["val"] = _read_list(val_list, root)

    # 2. Parse every file before touching anything.
    records: list[_Record] = []
    seen: dict[Path, str] = {}
    for split in SPLITS:
        for line in lines[split]:
            jp = _json_of_line(line, root)
            key = jp.resolve()
            if key in seen:
                stats["warnings"].append(f"{jp} listed more than once ({seen[key]} and {split}); later entry skipped")
                continue
            seen[key] = split
            records.append(_Record(jp, _load_json(jp), split))

    # 3. Resolve images and build instances; category ids in first-seen order over train then val.
    categories: dict[str, int] = {}
    images: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    anns: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    pending_writes: list[tuple[Path, bytes]] = []
    planned: set[Path] = set()
    used_names: dict[str, Path] = {}
    stem_index: dict[str, Path] | None = None
    image_id = 0
    for rec in records:
        data, jp = rec.data, rec.json_path
        image_path = str(data.get("imagePath") or "")
        found, stem_index = _find_image(images_dir, image_path, jp, stem_index)
        size: tuple[int, int] | None = None
        if found is None and data.get("imageData"):
            decoded = _decode_image_data(data["imageData"])
            if decoded is not None:
                raw, ext, size = decoded
                name = _base_name(image_path) or jp.name
                if Path(name).suffix.lower() not in IMAGE_EXTS:
                    name = Path(name).stem + ext
                found = images_dir / name
                if found in planned:
                    found = images_dir / f"{jp.stem}{ext}"
                if found in planned or found.exists():
                    stats["errors"].append({"json": str(jp), "error": f"cannot write embedded image: {found} is taken"})
                    continue
                planned.add(found)
                pending_writes.append((found, raw))
        if found is None:
            stats["errors"].append({"json": str(jp), "error": f"image {image_path!r} not found under {images_dir} "
                                                              "and no usable imageData; file skipped"})
            continue
        if found.name != _base_name(image_path):
            stats["images_resolved"].append({"json": str(jp), "image_path": image_path, "found": found.name})
        if size is None:
            size = _image_size(found)
        jw, jh = data.get("imageWidth"), data.get("imageHeight")
        if size is None:
            if not (isinstance(jw, int) and isinstance(jh, int) and jw > 0 and jh > 0):
                stats["errors"].append({"json": str(jp), "error": f"{found} unreadable and no imageWidth/imageHeight"})
                continue
            stats["warnings"].append(f"{found} could not be read; using imageWidth/imageHeight from {jp}")
            width, height = jw, jh
        else:
            width, height = size
            if (jw, jh) != (width, height):
                stats["warnings"].append(f"{jp}: imageWidth/imageHeight {jw}x{jh} differ from {found.name} "
                                         f"({width}x{height}); the real size is used")

        if found.name in used_names:  # two LabelMe files for one photo: both kept, but flag it
            stats["warnings"].append(f"{jp} and {used_names[found.name]} both annotate {found.name}")
        used_names.setdefault(found.name, jp)
        image_id += 1
        images[rec.split].append({"id": image_id, "file_name": found.name, "width": width, "height": height})
        for inst in _collect_instances(data, jp, stats):
            dense, polygons = _rasterise(inst, width, height)
            rle = coco_mask.encode(np.asfortranarray(dense))
            area = float(coco_mask.area(rle))
            if area <= 0 or not polygons:
                stats["skipped_shapes"]["empty_instance"] = stats["skipped_shapes"].get("empty_instance", 0) + 1
                continue
            cat_id = categories.setdefault(inst.label, len(categories) + 1)
            anns[rec.split].append({
                "id": len(anns[rec.split]) + 1, "image_id": image_id, "category_id": cat_id,
                "segmentation": polygons, "area": area,
                "bbox": [float(v) for v in coco_mask.toBbox(rle)], "iscrowd": 0,
            })

    # 4. Write: embedded images, list files (auto split), then the COCO files.
    for path, raw in pending_writes:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:  # "x": never overwrite an existing image
            f.write(raw)
        stats["images_written"].append(str(path))
    if stats["auto_split"]:
        stats["warnings"].append(f"{val_list.name} not found: split {train_list.name} "
                                 f"{len(lines['train'])}/{len(lines['val'])} with seed {seed}")
        for path, split in ((train_list, "train"), (val_list, "val")):
            backup = _write_list(path, lines[split])
            if backup is not None:
                stats["backups"].append(str(backup))
    cat_list = [{"id": cid, "name": name, "supercategory": name} for name, cid in categories.items()]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        out = root / "annotations" / f"instance_{split}.json"
        backup = write_json_replacing(out, {"images": images[split], "categories": cat_list,
                                            "annotations": anns[split]})
        if backup is not None:
            stats["backups"].append(str(backup))
        stats["outputs"].append(str(out))
        stats[split] = {"images": len(images[split]), "annotations": len(anns[split])}
        if not images[split]:
            stats["warnings"].append(f"the {split} split has no images")
    stats["categories"] = list(categories)
    stats["num_classes"] = len(categories)
    return stats
