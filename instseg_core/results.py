"""``InstanceSegResult``: the per-image result object, shaped like PaddleX 3.x's.

It is a ``dict`` with the keys ``input_path``, ``page_index``, ``input_img``, ``boxes`` and
``masks`` (in that order), plus ``print``, ``json``, ``img`` and the ``save_to_*`` methods with
PaddleX's file-naming rules. The full-resolution predictions stay available as ``.instances``.

Mask formats:

* ``"paddlex"`` (default): exactly PaddleX's layout. Box models: ``boxes`` entries are
  ``{"cls_id", "label", "score", "coordinate"}`` and each mask is a uint8 array cropped to its box.
  SOLOv2 (``instances.boxes_from_masks``): entries are ``{"label", "score", "class_id"}`` (no
  coordinate) and masks are full-image uint8 arrays.
* ``"rle"``: masks are full-image COCO RLE dicts ``{"size": [h, w], "counts": str}`` (compact, and
  JSON-ready). Every box entry keeps a ``coordinate``: SOLOv2 entries get one too, the mask's
  tight extent ``[x1, y1, x2, y2]`` (exclusive right/bottom) as ints, because an RLE mask alone is
  awkward to locate.
"""

from __future__ import annotations

import builtins
import json
import mimetypes
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from instseg_core import masks as M
from instseg_core.io import atomic_write
from instseg_core.structures import Instances
from instseg_core.visualize import draw_instances, label_for

MASK_FORMATS = ("paddlex", "rle")
PathLike = str | os.PathLike


class InstanceSegResult(dict):
    """Predictions for one image, PaddleX-compatible (see the module docstring for the formats).

    Args:
        input_path: where the image came from (file path or URL); None for in-memory arrays.
        page_index: page of a multi-page input (TIFF), else None.
        input_img: the original image, BGR HWC uint8.
        instances: predictions already thresholded and clipped by the post-processor.
        labels: class names, indexed by class id.
        mask_format: ``"paddlex"`` or ``"rle"``.
    """

    def __init__(
        self,
        *,
        input_path: str | None,
        page_index: int | None,
        input_img: np.ndarray,
        instances: Instances,
        labels: Sequence[str],
        mask_format: str = "paddlex",
    ) -> None:
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        super().__init__()
        self.instances = instances
        self.labels: tuple[str, ...] = tuple(str(x) for x in labels)
        self.mask_format = mask_format
        # PaddleX names the files of a path-less result "<unix time>_<4 random digits>", once per object.
        self._anonymous_stem = f"{int(time.time())}_{random.randint(1000, 9999)}"
        # set by a caller saving many results into one folder (e.g. ``a/img``) to keep names unique
        self.output_stem: str | None = None
        self["input_path"] = input_path
        self["page_index"] = page_index
        self["input_img"] = input_img
        self["boxes"] = _box_entries(instances, self.labels, with_coordinate=mask_format == "rle")
        self["masks"] = instances.rle_masks() if mask_format == "rle" else _paddlex_masks(instances)

    # ------------------------------------------------------------------ views

    def print(self, format_json: bool = True, indent: int = 4, ensure_ascii: bool = False,
              *, json_format: bool | None = None) -> None:
        """Print ``{"res": ...}`` to stdout without ``input_img`` and with masks shown as ``"..."``.

        ``format_json`` gives ``json.dumps`` output; otherwise a Python dict repr like PaddleX's,
        where coordinates show as their float32 repr (``1.4``, not ``1.399999976158142``).
        ``json_format`` is an alias (the name PaddleX's code uses; its docs say ``format_json``).
        """
        if json_format is not None:
            format_json = json_format
        data = {k: v for k, v in self.items() if k != "input_img"}
        data["masks"] = "..."
        if format_json:
            text = json.dumps({"res": _to_builtin(data)}, indent=indent, ensure_ascii=ensure_ascii)
        else:
            data["boxes"] = [_short_floats(b) for b in data["boxes"]]
            text = str({"res": data})
        builtins.print(text)

    @property
    def json(self) -> dict[str, Any]:
        """``{"res": data}`` without ``input_img``, masks in full, only JSON-native types."""
        data = {k: v for k, v in self.items() if k != "input_img"}
        if self.mask_format == "rle":
            data["masks"] = [dict(r) for r in self["masks"]]
        else:
            data["masks"] = [np.asarray(m).tolist() for m in self["masks"]]
        return {"res": _to_builtin(data)}

    @property
    def img(self) -> dict[str, Image.Image]:
        """``{"res": overlay}``: the input (as RGB) with masks, boxes and labels drawn."""
        return {"res": draw_instances(self["input_img"], self.instances, self.labels)}

    # ------------------------------------------------------------------ saving

    def save_to_json(self, save_path: PathLike, indent: int = 4, ensure_ascii: bool = False) -> str:
        """Write the ``res`` object as JSON; returns the file written.

        A ``save_path`` with a JSON mimetype (``*.json``) is the file itself; anything else is a
        directory that receives ``<stem>_res.json``.
        """
        path = self._output_path(save_path, _is_json_path(save_path), ".json")
        text = json.dumps(self.json["res"], indent=indent, ensure_ascii=ensure_ascii)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        return str(path)

    def save_to_img(self, save_path: PathLike) -> str:
        """Write the overlay image; returns the file written.

        A ``save_path`` with an image mimetype is the file itself (format from its extension);
        anything else is a directory that receives ``<stem>_res<suffix>``, where ``suffix`` is the
        input's image extension when Pillow can write it, else ``.png``.
        """
        path = self._output_path(save_path, _is_image_path(save_path), self._image_suffix())
        fmt = _pil_format(path.suffix)
        if fmt is None:
            raise ValueError(f"cannot write an image with extension {path.suffix!r}: {path}")
        image = self.img["res"]
        atomic_write(path, lambda f: image.save(f, format=fmt))
        return str(path)

    def save_all(self, save_path: PathLike) -> None:
        """``save_to_json`` then ``save_to_img`` (what PaddleX's CLI does); pass a directory."""
        self.save_to_json(save_path)
        self.save_to_img(save_path)

    # ------------------------------------------------------------------ naming

    def _stem(self) -> str:
        """File stem for outputs: ``output_stem`` if set, else the input's base name (``<name>_<page>``
        for pages)."""
        input_path = self["input_path"]
        if self.output_stem:
            stem = self.output_stem
        elif input_path:
            stem = Path(_path_part(input_path)).stem
        else:
            stem = self._anonymous_stem
        page = self["page_index"]
        return stem if page is None else f"{stem}_{page}"

    def _image_suffix(self) -> str:
        input_path = self["input_path"]
        if input_path:
            suffix = Path(_path_part(input_path)).suffix
            if _is_image_path("x" + suffix) and _pil_format(suffix) is not None:
                return suffix
        return ".png"

    def _output_path(self, save_path: PathLike, is_file: bool, suffix: str) -> Path:
        path = Path(save_path)
        return path if is_file else path / f"{self._stem()}_res{suffix}"


# ---------------------------------------------------------------------- boxes and masks


def _coordinate(box: np.ndarray, width: int, height: int) -> list[int | float]:
    """A clipped box as PaddleX writes it: values on the clip bound are ints, others floats.

    PaddleX clips with ``max(0, x1)`` / ``min(w, x2)``, which return the int bound whenever the
    value is at or past it; the post-processor already clipped, so equality marks those cases.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    return [0 if x1 == 0 else x1, 0 if y1 == 0 else y1, width if x2 == width else x2, height if y2 == height else y2]


def _box_entries(instances: Instances, labels: Sequence[str], with_coordinate: bool) -> list[dict[str, Any]]:
    height, width = instances.image_size
    entries = []
    for box, score, cid in zip(instances.boxes, instances.scores, instances.class_ids):
        cid = int(cid)
        if instances.boxes_from_masks:  # SOLOv2: no box of its own
            entry: dict[str, Any] = {"label": label_for(labels, cid), "score": float(score), "class_id": cid}
            if with_coordinate:
                entry["coordinate"] = [int(round(float(v))) for v in box]
        else:
            entry = {"cls_id": cid, "label": label_for(labels, cid), "score": float(score),
                     "coordinate": _coordinate(box, width, height)}
        entries.append(entry)
    return entries


def _full_mask(instances: Instances, i: int) -> np.ndarray:
    # One RLE decoded at a time: decoding all at once could take N full-size masks of memory.
    return M.decode_rle([instances.masks[i]])[0] if instances.is_rle else instances.masks[i]


def _paddlex_masks(instances: Instances) -> list[np.ndarray]:
    """uint8 masks: cropped to ``round()``-ed boxes for box models, full-image for SOLOv2."""
    out = []
    for i, box in enumerate(instances.boxes):
        mask = _full_mask(instances, i)
        if not instances.boxes_from_masks:
            x1, y1, x2, y2 = (round(float(v)) for v in box)  # Python round: half to even, like PaddleX
            mask = mask[y1:y2, x1:x2]
        out.append(mask.astype(np.uint8))  # a copy, so the full mask can be freed
    return out


# ---------------------------------------------------------------------- conversion helpers


def _to_builtin(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays (and tuples) into JSON-native Python values."""
    if isinstance(obj, dict):
        return {k: _to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _short_floats(entry: dict[str, Any]) -> dict[str, Any]:
    """A box entry whose float coordinates print as float32 reprs (PaddleX keeps np.float32 there)."""
    if "coordinate" not in entry:
        return entry
    coord = [float(str(np.float32(v))) if isinstance(v, float) else v for v in entry["coordinate"]]
    return {**entry, "coordinate": coord}


def _path_part(input_path: str) -> str:
    """The path of a local path or URL (query and fragment dropped from URLs)."""
    return urlparse(input_path).path if "://" in input_path else input_path


def _mimetype(path: PathLike) -> str | None:
    return mimetypes.guess_type(os.fspath(path))[0]


def _is_json_path(path: PathLike) -> bool:
    return _mimetype(path) == "application/json"


def _is_image_path(path: PathLike) -> bool:
    return (_mimetype(path) or "").startswith("image/")


def _pil_format(suffix: str) -> str | None:
    """The Pillow format that writes files with ``suffix``, or None if Pillow cannot write them."""
    fmt = Image.registered_extensions().get(suffix.lower())
    return fmt if fmt in Image.SAVE else None


# ---------------------------------------------------------------------- atomic files


