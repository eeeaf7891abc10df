"""Convert a LabelMe-annotated dataset to COCO instance segmentation (PaddleX ``CheckDataset.convert``).

Accepted input layouts (``<root>`` is ``Global.dataset_dir``):

1. **PaddleX's LabelMe layout** (spec section 4.5)::

       <root>/images/*                 photos
       <root>/annotations/*.json       LabelMe files
       <root>/train_anno_list.txt      one LabelMe path (relative to <root>) per line
       <root>/val_anno_list.txt        optional

   Same as PaddleX: a missing ``val_anno_list.txt`` makes the converter move
   ``train_anno_list.txt`` to ``train_anno_list.txt.bak`` and write a shuffled 80/20 split into
   the two list files; a list line's JSON path is its last space-separated token.

2. **A folder of LabelMe files, no list files**: LabelMe's own layout (each JSON next to its
   photo, e.g. ``<root>/*.json`` + ``<root>/*.jpg`` or ``<root>/data_annotated/...``), or PaddleX's
   layout above without ``train_anno_list.txt``. Every LabelMe file under ``<root>`` (any depth;
   hidden folders and COCO files skipped) is used and split 80/20 with the seed; no list file is
   written. Photos outside ``<root>/images`` are hard-linked (copied across file systems) to
   ``<root>/images/<their path below root>``, so ``file_name`` keeps that relative path.

``<root>/labels.txt`` (LabelMe's ``--labels`` file), when present, fixes the categories: one name
per line, ``__ignore__`` and ``_background_`` lines (LabelMe's convention for its first two
lines) and blank lines skipped; ids 1, 2, ... in file order; every listed name is a category even
if unused; a shape label that is not listed is an error naming it and a file that uses it.
Without it, category ids follow first-seen order (train files first), as PaddleX.

Output: ``<root>/annotations/instance_train.json`` and ``instance_val.json`` (compact UTF-8 JSON, key
order ``images, categories, annotations``). Images are ``{id, file_name, width, height}``;
annotations ``{id, image_id, category_id, segmentation, area, bbox, iscrowd: 0}`` with
``segmentation`` a list of flat ``[x1, y1, x2, y2, ...]`` polygons and ``area``/``bbox`` taken from
the RLE of the rasterised instance (polygons filled with PIL, outline included, as PaddleX does).
Image ids are unique across both files (as PaddleX); annotation ids restart at 1 in each file.

Improvements over PaddleX (which only accepts single polygons with more than 2 points):

* **Reproducible split**: the shuffle uses ``random.Random(seed)``; the ratio is configurable;
  train gets at least one file.
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
* **Embedded images**: when the image file is missing but the JSON carries ``imageData`` (base64),
  the image is written under ``images/`` (name from ``imagePath``; the extension is the decoded
  format's when ``imagePath`` has no image extension). Existing files are never overwritten.
* **Image look-up**: ``imagePath`` (``/`` or ``\\`` separated) is looked up as a base name under
  ``images/``, then relative to the JSON file (LabelMe's convention), then by stem (any image
  extension) in both folders, then by the JSON file's stem. Unresolvable images are skipped and
  reported in ``stats["errors"]`` with the JSON path instead of producing an annotation file that
  points at nothing; when no image at all is found the conversion stops before writing anything.
* **Size check**: ``imageHeight``/``imageWidth`` are compared with the real image (EXIF orientation
  applied, as LabelMe does); on a mismatch the real size is used and a warning recorded.
* **Both files list every category**, so ``num_classes`` does not depend on the split.
* **Safe writes**: everything is parsed and validated before any file is touched; replaced files
  are renamed to ``.bak`` (``.bak.1``, ``.bak.2``... when taken) and never deleted.
* **Clear errors**: no LabelMe file, a missing list file, a listed JSON that does not exist,
  invalid JSON, no image found, a label missing from ``labels.txt`` or an ``images/`` file that
  would have to be replaced raise :class:`ConvertError` naming the file or folder.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from instseg_core.datasets.check import DatasetError
from instseg_core.datasets.layout import IMAGE_EXTS, ImagePlacer, LayoutError, find_labelme_files
from instseg_core.datasets.split import seeded_cut, write_json_replacing, write_replacing

__all__ = ["ConvertError", "IMAGE_EXTS", "LABELS_FILE", "convert_labelme_to_coco", "read_labels"]

IGNORE_LABEL = "__ignore__"
BACKGROUND_LABEL = "_background_"
LABELS_FILE = "labels.txt"
TRAIN_LIST, VAL_LIST = "train_anno_list.txt", "val_anno_list.txt"
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


# ----------------------------------------------------------------------------- list files and labels

def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ConvertError(f"cannot read {path}: {e}") from None


def _read_list(path: Path, root: Path) -> list[str]:
    """Non-empty lines of a list file, each checked to name an existing LabelMe JSON."""
    lines = [ln.strip() for ln in _read_text(path).splitlines()]
    lines = [ln for ln in lines if ln]
    for i, line in enumerate(lines, 1):
        if not _json_of_line(line, root).is_file():
            raise ConvertError(f"{path}, line {i}: annotation file {_json_of_line(line, root)} does not exist")
    return lines


def _json_of_line(line: str, root: Path) -> Path:
    # PaddleX takes the last space-separated token; a whole line naming a file (path with spaces) wins.
    whole = root / line
    return whole if whole.is_file() else root / line.split(" ")[-1]


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Category names of a LabelMe ``labels.txt``, in order.

    Blank lines and LabelMe's ``__ignore__``/``_background_`` lines are skipped. Raises
    :class:`ConvertError` naming the file and line for a repeated name, or when no name is left.
    """
    path = Path(path)
    names: list[str] = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        name = line.strip()
        if not name or name in (IGNORE_LABEL, BACKGROUND_LABEL):
            continue
        if name in names:
            raise ConvertError(f"{path}, line {i}: label {name!r} is listed twice")
        names.append(name)
    if not names:
        raise ConvertError(f"{path} lists no label (besides {IGNORE_LABEL}/{BACKGROUND_LABEL}); add the class "
                           "names, one per line, or delete the file")
    return names


# ----------------------------------------------------------------------------- images

def _base_name(image_path: str) -> str:
    # LabelMe on Windows writes backslash paths such as "..\\images\\a.jpg"; PaddleX only splits on "/".
    return image_path.replace("\\", "/").split("/")[-1]


def _stem_index(folder: Path) -> dict[str, Path]:
    """Image files directly under ``folder`` by stem (first in sorted order wins)."""
    index: dict[str, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                index.setdefault(p.stem, p)
    return index


class _ImageFinder:
    """Resolves ``imagePath`` values; folder listings (for look-ups by stem) are made once."""

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir
        self._indexes: dict[Path, dict[str, Path]] = {}

    def _index(self, folder: Path) -> dict[str, Path]:
        if folder not in self._indexes:
            self._indexes[folder] = _stem_index(folder)
        return self._indexes[folder]

    def find(self, image_path: str, json_path: Path) -> Path | None:
        """Base name under ``images/``, path relative to the JSON, then stems in both folders."""
        name = _base_name(image_path)
        if name and (self.images_dir / name).is_file():
            return self.images_dir / name
        rel = PurePosixPath(image_path.replace("\\", "/"))
        if name and not rel.is_absolute() and ":" not in rel.parts[0]:  # "C:/..." is absolute on Windows
            beside = json_path.parent / rel
            if beside.suffix.lower() in IMAGE_EXTS and beside.is_file():
                return beside
        for folder in dict.fromkeys((self.images_dir, json_path.parent)):
            index = self._index(folder)
            for stem in (Path(name).stem if name else None, json_path.stem):
                if stem and stem in index:
                    return index[stem]
        return None


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
        if not isinstance(shape, dict):
            skipped["not_an_object"] = skipped.get("not_an_object", 0) + 1
            continue
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
        except (ValueError, TypeError):
            raise ConvertError(f"{json_path}: shape {idx} ({label!r}) has malformed points") from None
        if not np.isfinite(pts).all():
            raise ConvertError(f"{json_path}: shape {idx} ({label!r}) has a NaN or infinite coordinate")
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
        if not isinstance(gid, (int, float, str)) or isinstance(gid, bool):  # null, or a malformed (list...) id
            if gid is not None:
                stats["warnings"].append(f"{json_path}: shape {idx} ({label!r}) has an unusable group_id {gid!r}; "
                                         "treated as none")
            gid = None
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
    except OSError as e:
        raise ConvertError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: not a LabelMe file (top level is not a JSON object)")
    return data


def _write_list(path: Path, lines: list[str]) -> Path | None:
    return write_replacing(path, "".join(ln + "\n" for ln in lines).encode("utf-8"))


LAYOUTS_HELP = ("accepted layouts: LabelMe files next to their photos anywhere under the folder (LabelMe's own, "
                f"optional {LABELS_FILE}), or PaddleX's images/ + annotations/*.json [+ {TRAIN_LIST}]")


@dataclass
class _Plan:
    """The JSON files of each split; ``list_lines`` is set when the PaddleX list files must be (re)written."""

    files: dict[str, list[Path]]
    layout: str
    list_lines: dict[str, list[str]] | None = None
    loaded: dict[Path, dict[str, Any]] = field(default_factory=dict)


def _plan_from_lists(root: Path, seed: int, train_ratio: float) -> _Plan:
    """PaddleX's layout: the list files name the JSON files (an 80/20 split when the val list is missing)."""
    lines = {"train": _read_list(root / TRAIN_LIST, root)}
    list_lines = None
    if (root / VAL_LIST).is_file():
        lines["val"] = _read_list(root / VAL_LIST, root)
    else:
        lines["train"], lines["val"] = seeded_cut(lines["train"], seed, train_ratio)
        list_lines = lines
    files = {s: [_json_of_line(ln, root) for ln in lines[s]] for s in SPLITS}
    if not files["train"] and not files["val"]:
        raise ConvertError(f"{root / TRAIN_LIST} lists no LabelMe file; add one path per line (relative to {root})")
    return _Plan(files, "paddlex", list_lines)


def _plan_from_folder(root: Path, seed: int, train_ratio: float) -> _Plan:
    """No list files: every LabelMe file under ``root``, split with the seed."""
    if (root / VAL_LIST).is_file():
        raise ConvertError(f"{root / VAL_LIST} exists but {root / TRAIN_LIST} does not: add the train list, or "
                           f"remove {VAL_LIST} to use every LabelMe file under {root}")
    loaded = find_labelme_files(root, load=_load_json)
    if not loaded:
        raise ConvertError(f"no LabelMe file (a .json with 'shapes' and 'imagePath') found in {root} or its "
                           f"subfolders; {LAYOUTS_HELP}")
    train, val = seeded_cut(sorted(loaded), seed, train_ratio)
    return _Plan({"train": train, "val": val}, "folder", None, loaded)


def _records(plan: _Plan, stats: dict[str, Any]) -> list[_Record]:
    records: list[_Record] = []
    seen: dict[Path, str] = {}
    for split in SPLITS:
        for jp in plan.files[split]:
            key = jp.resolve()
            if key in seen:
                stats["warnings"].append(f"{jp} listed more than once ({seen[key]} and {split}); later entry skipped")
                continue
            seen[key] = split
            records.append(_Record(jp, plan.loaded.get(jp) or _load_json(jp), split))
    return records


class _Converter:
    """Builds both COCO files in memory (no writes) from the records, then writes everything."""

    def __init__(self, root: Path, labels: list[str] | None, stats: dict[str, Any]) -> None:
        self.root, self.images_dir, self.stats = root, root / "images", stats
        self.labels = labels
        self.categories: dict[str, int] = {name: i for i, name in enumerate(labels or [], 1)}
        self.unknown: dict[str, Path] = {}  # label missing from labels.txt -> first file using it
        self.images: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.anns: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.embedded: list[tuple[Path, bytes]] = []
        self.placer = ImagePlacer(root, self.images_dir)
        self.finder = _ImageFinder(self.images_dir)
        self.used_names: dict[str, Path] = {}
        self.missing: dict[Path, str] = {}  # LabelMe file -> its imagePath, when no photo was found

    def _error(self, jp: Path, message: str) -> None:
        self.stats["errors"].append({"json": str(jp), "error": message})

    def _embedded_image(self, data: dict[str, Any], jp: Path) -> tuple[Path, tuple[int, int]] | None:
        decoded = _decode_image_data(data["imageData"])
        if decoded is None:
            return None
        raw, ext, size = decoded
        name = _base_name(str(data.get("imagePath") or "")) or jp.name
        if Path(name).suffix.lower() not in IMAGE_EXTS:
            name = Path(name).stem + ext
        planned = {p for p, _ in self.embedded} | set(self.placer.planned)
        found = self.images_dir / name
        if found in planned:
            found = self.images_dir / f"{jp.stem}{ext}"
        if found in planned or found.exists():
            self._error(jp, f"cannot write embedded image: {found} is taken")
            return None
        self.embedded.append((found, raw))
        return found, size

    def _size(self, found: Path, size: tuple[int, int] | None, data: dict[str, Any],
              jp: Path) -> tuple[int, int] | None:
        """The real (oriented) size; the JSON's when the file is unreadable; None when neither is usable."""
        size = size or _image_size(found)
        jw, jh = data.get("imageWidth"), data.get("imageHeight")
        if size is None:
            if not (isinstance(jw, int) and isinstance(jh, int) and jw > 0 and jh > 0):
                self._error(jp, f"{found} unreadable and no imageWidth/imageHeight")
                return None
            self.stats["warnings"].append(f"{found} could not be read; using imageWidth/imageHeight from {jp}")
            return jw, jh
        if (jw, jh) != size:
            self.stats["warnings"].append(f"{jp}: imageWidth/imageHeight {jw}x{jh} differ from {found.name} "
                                          f"({size[0]}x{size[1]}); the real size is used")
        return size

    def _locate(self, rec: _Record) -> tuple[Path, str, tuple[int, int] | None] | None:
        """The photo of a record, its ``file_name`` and (for embedded data) its size; None if absent."""
        data, jp = rec.data, rec.json_path
        image_path = str(data.get("imagePath") or "")
        found, size = self.finder.find(image_path, jp), None
        if found is None and data.get("imageData"):
            embedded = self._embedded_image(data, jp)
            if embedded is None:
                return None
            found, size = embedded
        if found is None:
            self._error(jp, f"image {image_path!r} not found under {self.images_dir} or {jp.parent}, "
                            "and no usable imageData; file skipped")
            self.missing.setdefault(jp, image_path)
            return None
        if found.name != _base_name(image_path):
            self.stats["images_resolved"].append({"json": str(jp), "image_path": image_path, "found": found.name})
        if size is not None:  # embedded: written under images/ later
            return found, found.relative_to(self.images_dir).as_posix(), size
        try:
            file_name = self.placer.place(found)
        except LayoutError as e:
            raise ConvertError(f"{jp}: {e}") from None
        return found, file_name, None

    def add(self, rec: _Record, image_id: int) -> bool:
        """Add one LabelMe file's image and instances; False (with an error recorded) when skipped."""
        located = self._locate(rec)
        if located is None:
            return False
        found, file_name, size = located
        wh = self._size(found, size, rec.data, rec.json_path)
        if wh is None:
            return False
        if file_name in self.used_names:  # two LabelMe files for one photo: both kept, but flag it
            self.stats["warnings"].append(f"{rec.json_path} and {self.used_names[file_name]} both annotate "
                                          f"{file_name}")
        self.used_names.setdefault(file_name, rec.json_path)
        self.images[rec.split].append({"id": image_id, "file_name": file_name, "width": wh[0], "height": wh[1]})
        for inst in _collect_instances(rec.data, rec.json_path, self.stats):
            self._add_instance(inst, rec, image_id, wh)
        return True

    def _add_instance(self, inst: _Instance, rec: _Record, image_id: int, wh: tuple[int, int]) -> None:
        if self.labels is not None and inst.label not in self.categories:
            self.unknown.setdefault(inst.label, rec.json_path)
            return
        dense, polygons = _rasterise(inst, *wh)
        rle = coco_mask.encode(np.asfortranarray(dense))
        area = float(coco_mask.area(rle))
        skipped = self.stats["skipped_shapes"]
        if area <= 0 or not polygons:
            skipped["empty_instance"] = skipped.get("empty_instance", 0) + 1
            return
        anns = self.anns[rec.split]
        anns.append({
            "id": len(anns) + 1, "image_id": image_id,
            "category_id": self.categories.setdefault(inst.label, len(self.categories) + 1),
            "segmentation": polygons, "area": area,
            "bbox": [float(v) for v in coco_mask.toBbox(rle)], "iscrowd": 0,
        })

    def check_complete(self, records: list[_Record]) -> None:
        """Raise (before anything is written) when no image was found or a label is not in labels.txt."""
        if not any(self.images.values()):
            folders = list(dict.fromkeys(str(r.json_path.parent) for r in records))
            shown = ", ".join(folders[:3]) + (f" (+{len(folders) - 3} more)" if len(folders) > 3 else "")
            example = next((f" (e.g. {jp.name} names {path!r})" for jp, path in self.missing.items()), "")
            raise ConvertError(f"no image found for any of the {len(records)} LabelMe file(s){example}: looked in "
                               f"{self.images_dir} and next to the JSON files in {shown}; nothing was written")
        if self.unknown:
            label, where = next(iter(self.unknown.items()))
            names = ", ".join(repr(k) for k in self.unknown)
            raise ConvertError(f"label(s) {names} not in {self.root / LABELS_FILE} (e.g. {label!r} in {where}): add "
                               "them to it or fix the annotations; nothing was written")

    def write(self) -> None:
        """Embedded images, linked photos, then both COCO files (replaced files kept as ``.bak``)."""
        for path, raw in self.embedded:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:  # "x": never overwrite an existing image
                f.write(raw)
            self.stats["images_written"].append(str(path))
        self.placer.apply()
        self.stats["images_linked"], self.stats["images_copied"] = self.placer.linked, self.placer.copied
        cat_list = [{"id": cid, "name": name, "supercategory": name} for name, cid in self.categories.items()]
        for split in SPLITS:
            out = self.root / "annotations" / f"instance_{split}.json"
            backup = write_json_replacing(out, {"images": self.images[split], "categories": cat_list,
                                                "annotations": self.anns[split]})
            if backup is not None:
                self.stats["backups"].append(str(backup))
            self.stats["outputs"].append(str(out))
            self.stats[split] = {"images": len(self.images[split]), "annotations": len(self.anns[split])}
            if not self.images[split]:
                self.stats["warnings"].append(f"the {split} split has no images")
        self.stats["categories"] = list(self.categories)
        self.stats["num_classes"] = len(self.categories)


def _labels(root: Path, stats: dict[str, Any]) -> list[str] | None:
    path = root / LABELS_FILE
    if path.is_file():
        stats["labels_file"] = str(path)
        return read_labels(path)
    if (root.parent / LABELS_FILE).is_file():
        stats["warnings"].append(f"{root.parent / LABELS_FILE} is not used (only {path} is read): category ids "
                                 f"follow first-seen order")
    return None


def _write_lists(root: Path, plan: _Plan, seed: int, stats: dict[str, Any]) -> None:
    lines = plan.list_lines or {}
    stats["warnings"].append(f"{VAL_LIST} not found: split {TRAIN_LIST} "
                             f"{len(lines['train'])}/{len(lines['val'])} with seed {seed}")
    for name, split in ((TRAIN_LIST, "train"), (VAL_LIST, "val")):
        backup = _write_list(root / name, lines[split])
        if backup is not None:
            stats["backups"].append(str(backup))


def convert_labelme_to_coco(dataset_dir: str | os.PathLike, *, seed: int = 0,
                            train_ratio: float = 0.8) -> dict[str, Any]:
    """Convert the LabelMe dataset ``<dataset_dir>`` to ``annotations/instance_{train,val}.json``.

    Both layouts of the module docstring are accepted: PaddleX's (``train_anno_list.txt``) and a
    folder of LabelMe files next to their photos. Returns stats: ``{"layout": "paddlex"|"folder",
    "train": {"images", "annotations"}, "val": {...}, "categories": [names], "num_classes",
    "labels_file", "auto_split", "seed", "ignored_shapes", "skipped_shapes": {type: count},
    "images_written": [paths], "images_linked", "images_copied", "images_resolved": [{"json",
    "image_path", "found"}], "errors": [{"json", "error"}], "warnings": [str], "backups": [paths],
    "outputs": [paths]}``. Raises :class:`ConvertError` (a one-line message naming the file or
    folder) for no LabelMe file, a bad list or ``labels.txt``, invalid JSON, no image found at all,
    a label missing from ``labels.txt``, or an ``images/`` file in the way. Nothing is modified
    when it raises.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ConvertError(f"dataset directory {root} does not exist or is not a directory")
    if not 0.0 < train_ratio <= 1.0:
        raise ConvertError(f"train_ratio must be in (0, 1], got {train_ratio}")
    stats: dict[str, Any] = {
        "seed": seed, "ignored_shapes": 0, "skipped_shapes": {}, "labels_file": None, "images_written": [],
        "images_linked": 0, "images_copied": 0, "images_resolved": [], "errors": [], "warnings": [],
        "backups": [], "outputs": [],
    }
    if (root / TRAIN_LIST).is_file():
        plan = _plan_from_lists(root, seed, train_ratio)
    else:
        plan = _plan_from_folder(root, seed, train_ratio)
    stats["layout"], stats["auto_split"] = plan.layout, plan.layout == "folder" or plan.list_lines is not None
    labels = _labels(root, stats)
    records = _records(plan, stats)

    converter = _Converter(root, labels, stats)
    image_id = 0
    for rec in records:
        if converter.add(rec, image_id + 1):
            image_id += 1
    converter.check_complete(records)

    if plan.list_lines is not None:
        _write_lists(root, plan, seed, stats)
    if plan.layout == "folder":
        stats["warnings"].append(f"no {TRAIN_LIST}: used the {len(records)} LabelMe file(s) under {root}, "
                                 f"split {len(plan.files['train'])}/{len(plan.files['val'])} with seed {seed}")
    converter.write()
    return stats
