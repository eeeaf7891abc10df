"""Recognising dataset layouts other than PaddleX's, and placing their images where it expects them.

The dataset tools work on PaddleX's COCO layout (``images/`` + ``annotations/instance_{train,val}.json``).
Two other layouts are common and can be converted to it (``CheckDataset.convert``):

* **LabelMe**: LabelMe JSON files (an object with a ``shapes`` list) with their photos, either
  PaddleX's LabelMe layout (``annotations/*.json``, ``images/``, list files) or LabelMe's own
  (JSON next to each photo in one folder, maybe ``labels.txt``): :func:`find_labelme_files`.
* **Standard COCO**: ``annotations/instances_<name>.json`` with the photos in ``<name>/`` (or
  ``images/<name>/``), e.g. ``instances_val2017.json`` + ``val2017/``: :func:`find_standard_coco`.

:func:`layout_hint` turns a recognised layout into the one-line advice appended to "not PaddleX's
layout" errors. :class:`ImagePlacer` plans hard links (copies across file systems) of photos into
``images/`` and refuses, before anything is written, a target that already holds another file.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_EXTS", "CocoSource", "ImagePlacer", "LayoutError", "find_labelme_files", "find_standard_coco",
    "is_labelme", "layout_hint",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# COCO files that are never LabelMe files: skipped by name so big annotation files are not parsed.
_COCO_NAME = re.compile(r"^(instances?_.*|annotations)\.json$")
_STANDARD_ANN = re.compile(r"^instances_(?P<name>.+)\.json$")
_HINT_MAX_FILES = 20
_HINT_MAX_BYTES = 64 << 20
CONVERT_HINT = "-o CheckDataset.convert.enable=True -o CheckDataset.convert.src_dataset_type={}"


class LayoutError(Exception):
    """A layout cannot be used as asked (ambiguous folders, an ``images/`` target that is taken...)."""


def is_labelme(data: Any) -> bool:
    """True for a parsed LabelMe file: a JSON object with a ``shapes`` list and ``imagePath``/``imageData``."""
    return isinstance(data, dict) and isinstance(data.get("shapes"), list) and \
        ("imagePath" in data or "imageData" in data)


def _json_candidates(root: Path) -> list[Path]:
    """``*.json`` files under ``root`` (sorted), skipping hidden folders and COCO annotation files."""
    found = []
    for path in root.rglob("*.json"):
        rel = path.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or _COCO_NAME.match(path.name) or not path.is_file():
            continue
        found.append(path)
    return sorted(found)


def find_labelme_files(root: str | os.PathLike[str], load: Any = None) -> dict[Path, dict[str, Any]]:
    """Every LabelMe file under ``root`` (any depth, hidden folders skipped) with its parsed content.

    ``load(path) -> object`` parses one file and may raise (the converter passes one that raises a
    clear error on invalid JSON); by default unreadable files are skipped. JSON files that are not
    LabelMe files (no ``shapes`` list) are left out; COCO files (``instance*_*.json``,
    ``annotations.json``) are not even read.
    """
    out: dict[Path, dict[str, Any]] = {}
    for path in _json_candidates(Path(root)):
        data = load(path) if load is not None else _try_load(path)
        if is_labelme(data):
            out[path] = data
    return out


def _try_load(path: Path, max_bytes: int | None = None) -> Any:
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            return None
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (OSError, ValueError):  # unreadable or not JSON: simply not a LabelMe file here
        return None


@dataclass(frozen=True)
class CocoSource:
    """One split of a standard COCO layout: its annotation file and the folder holding its photos."""

    split: str  # "train" or "val"
    name: str  # e.g. "val2017"
    annotations: Path
    image_dir: Path


def find_standard_coco(root: str | os.PathLike[str]) -> tuple[list[CocoSource], list[str]]:
    """Standard COCO splits in ``root``: ``annotations/instances_<name>.json`` whose ``<name>`` starts
    with ``train`` or ``val`` and whose photos are in ``root/<name>/`` or ``root/images/<name>/``.

    Returns ``(sources, notes)``; ``notes`` says why other ``instances_*.json`` files were left out
    (no such folder, e.g. ``instances_val2017_mini8.json``, or a name that is neither train nor val).
    """
    root = Path(root)
    ann_dir = root / "annotations"
    sources: list[CocoSource] = []
    notes: list[str] = []
    if not ann_dir.is_dir():
        return sources, notes
    for path in sorted(ann_dir.glob("instances_*.json")):
        name = _STANDARD_ANN.match(path.name).group("name")  # type: ignore[union-attr]
        split = "train" if name.startswith("train") else "val" if name.startswith("val") else None
        image_dir = next((d for d in (root / name, root / "images" / name) if d.is_dir()), None)
        if split is None:
            notes.append(f"{path.name}: '{name}' is neither a train nor a val split; not used")
        elif image_dir is None:
            notes.append(f"{path.name}: no image folder {name}/ (or images/{name}/) in {root}; not used")
        else:
            sources.append(CocoSource(split, name, path, image_dir))
    return sources, notes


def _has_labelme_file(root: Path) -> bool:
    """Cheap look for a LabelMe file in ``root``, ``root/annotations`` or a direct subfolder (hints only)."""
    seen = 0
    try:
        subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:  # unreadable: no hint rather than a second error
        return False
    for folder in [root, root / "annotations", *subfolders]:
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            if _COCO_NAME.match(path.name):
                continue
            if is_labelme(_try_load(path, _HINT_MAX_BYTES)):
                return True
            seen += 1
            if seen >= _HINT_MAX_FILES:
                return False
    return False


def layout_hint(root: str | os.PathLike[str]) -> str:
    """Advice for a folder that is not in PaddleX's COCO layout ("" when nothing is recognised).

    A standard COCO layout or LabelMe files get the exact ``-o`` options that convert them.
    """
    root = Path(root)
    if not root.is_dir():
        return ""
    sources, _ = find_standard_coco(root)
    if sources:
        found = ", ".join(f"annotations/{s.annotations.name} + {s.image_dir.relative_to(root).as_posix()}/"
                          for s in sources)
        return (f"{root} is in the standard COCO layout ({found}): convert it to PaddleX's layout (images/ + "
                "annotations/instance_{train,val}.json) with " + CONVERT_HINT.format("COCO"))
    if _has_labelme_file(root):
        return f"{root} holds LabelMe files: convert them with " + CONVERT_HINT.format("LabelMe")
    return ""


@dataclass
class ImagePlacer:
    """Plans putting photos under ``images_dir`` (hard link, or a copy across file systems).

    :meth:`place` decides the name and checks the target without writing; :meth:`apply` does the
    planned writes. A target that already exists is reused when it is the same file or has the same
    bytes, and is an error otherwise (nothing is ever overwritten).
    """

    root: Path
    images_dir: Path
    planned: dict[Path, Path] = field(default_factory=dict)  # target -> source
    linked: int = 0
    copied: int = 0

    def file_name(self, source: Path) -> str:
        """``file_name`` for a photo: relative to ``images_dir`` when inside it, else the target's."""
        if _is_within(source, self.images_dir):
            return _abs(source).relative_to(_abs(self.images_dir)).as_posix()
        return self.target(source).relative_to(self.images_dir).as_posix()

    def target(self, source: Path) -> Path:
        """Where a photo outside ``images_dir`` goes: its path below the dataset root (its name if outside)."""
        rel = _abs(source).relative_to(_abs(self.root)) if _is_within(source, self.root) else Path(source.name)
        return self.images_dir / rel

    def place(self, source: Path) -> str:
        """Plan ``source`` and return its ``file_name``; raises :class:`LayoutError` on a taken target."""
        if _is_within(source, self.images_dir):
            return self.file_name(source)
        dst = self.target(source)
        other = self.planned.get(dst)
        if other is not None and _abs(other) != _abs(source):
            raise LayoutError(f"{other} and {source} would both become {dst}")
        if other is None and (dst.exists() or dst.is_symlink()) and not _same_file(dst, source):
            raise LayoutError(f"{dst} already exists and is not a copy of {source}; move it away (nothing "
                              "was written)")
        if other is None and not dst.exists():
            self.planned[dst] = source
        return self.file_name(source)

    def apply(self) -> None:
        """Write the planned links (copies when a hard link is impossible)."""
        for dst, src in self.planned.items():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
                self.linked += 1
            except OSError:  # another file system, or links not allowed: copy instead
                shutil.copy2(src, dst)
                self.copied += 1
        self.planned.clear()


def _abs(path: Path) -> Path:
    """Absolute and normalised (``..`` removed) without following symlinks."""
    return Path(os.path.abspath(path))


def _is_within(path: Path, folder: Path) -> bool:
    return _abs(path).is_relative_to(_abs(folder))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False
