"""Label Studio tasks with predictions, and the labeling config they go with (no Ray, no I/O).

A task is ``{"data": {"image": <what the editor loads>, "uri": <the image's URI>},
"predictions": [{"model_version", "score", "result": [region, ...]}]}``; one region per instance:

* ``kind="brush"`` (default): a ``brushlabels`` region holding the whole mask in Label Studio's
  brush RLE (:mod:`instseg_core.brush_rle`): holes and separate parts kept, editable with the brush.
* ``kind="polygon"``: ``polygonlabels`` regions, one per outer contour (points in percent of the
  image size, as Label Studio stores them); a multi-part mask gives several regions, holes are
  filled (a polygon has none).

Each region carries the instance's ``score``; the prediction's ``score`` is the lowest region score
(a task is as uncertain as its least certain instance, so sorting by it in the data manager puts
the images to check first), absent when the model found nothing.

Where the editor gets the image (``data.image``, :func:`image_reference`): http(s) URLs as they
are; ``s3://``, ``gs://`` and other object-store URIs as they are (a cloud storage connected to
the project, with the same bucket, turns them into signed URLs); local files through Label
Studio's Local Files storage: ``/data/local-files/?d=<path below LOCAL_FILES_DOCUMENT_ROOT>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from instseg_core import brush_rle
from instseg_core.io import is_remote
from instseg_core.masks import decode_rle, mask_to_polygons

__all__ = ["FROM_NAME", "KINDS", "TO_NAME", "image_reference", "labeling_config", "prediction_regions", "task"]

KINDS = ("brush", "polygon")
FROM_NAME = "label"  # the control tag's name: every region's from_name
TO_NAME = "image"  # the Image tag's name and its $image variable

_TAGS = {"brush": ("BrushLabels", "brushlabels"), "polygon": ("PolygonLabels", "polygonlabels")}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Label Studio region kind must be one of {KINDS}, got {kind!r}")


def _hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def labeling_config(labels: Sequence[str], kind: str = "brush") -> str:
    """The labeling config XML for tasks of :func:`task`: an ``Image`` named ``image`` and one
    control tag (``BrushLabels`` or ``PolygonLabels``) named ``label`` with every label of the
    model, in its order, coloured as the overlays colour class ``k`` (PaddleX's palette)."""
    from instseg_core.visualize import PALETTE

    _check_kind(kind)
    if not labels:
        raise ValueError("a labeling config needs the model's label list (non-empty)")
    tag = _TAGS[kind][0]
    lines = ["<View>", f'  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true" zoomControl="true"/>',
             f'  <{tag} name="{FROM_NAME}" toName="{TO_NAME}">']
    for k, label in enumerate(labels):
        color = _hex(PALETTE[k % len(PALETTE)])
        lines.append(f"    <Label value={quoteattr(str(label))} background={quoteattr(color)}/>")
    lines += [f"  </{tag}>", "</View>", ""]
    return "\n".join(lines)


def image_reference(uri: str, local_files_root: str = "/") -> str:
    """What ``data.image`` holds for ``uri`` so that Label Studio can open it.

    Local paths become ``/data/local-files/?d=<path relative to local_files_root>`` (percent-
    encoded; the server must run with ``LOCAL_FILES_SERVING_ENABLED=true`` and
    ``LOCAL_FILES_DOCUMENT_ROOT=<local_files_root>``, and the project needs a Local Files storage
    whose path contains the image). Raises ``ValueError`` for a path outside ``local_files_root``.
    URLs and object-store URIs are returned as they are."""
    if is_remote(uri):
        return uri
    path = os.path.abspath(uri.removeprefix("file://"))
    root = os.path.abspath(local_files_root)
    rel = os.path.relpath(path, root)
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        raise ValueError(f"{path} is not below the Label Studio local files root {root} "
                         "(set the local files root to a directory that holds every image)")
    return "/data/local-files/?d=" + quote(rel.replace(os.sep, "/"), safe="/")


def _score(value: float) -> float:
    return float(f"{float(value):.6g}")  # float32 scores without their float64 noise


def prediction_regions(instances: Iterable[Mapping[str, Any]], width: int, height: int, labels: Sequence[str], *,
                       kind: str = "brush", min_score: float = 0.0) -> list[dict[str, Any]]:
    """Label Studio regions of one image's instances (dicts with ``class_id``, ``score``, ``rle``
    (COCO RLE) and optionally ``label`` and ``area``, as the batch job's rows hold them).

    Instances below ``min_score`` and empty masks are left out (an empty mask is no label)."""
    _check_kind(kind)
    tag = _TAGS[kind][1]
    regions: list[dict[str, Any]] = []
    for k, item in enumerate(instances):
        score = float(item["score"])
        if score < min_score or ("area" in item and int(item["area"]) <= 0):
            continue
        label = item.get("label") or labels[int(item["class_id"])]
        mask = decode_rle([item["rle"]])[0]  # one mask at a time: a crowded photo's [N, H, W] is large
        if mask.shape != (height, width):
            raise ValueError(f"instance {k}: mask of {mask.shape[1]}x{mask.shape[0]} on a {width}x{height} image")
        base = {"from_name": FROM_NAME, "to_name": TO_NAME, "type": tag, "original_width": int(width),
                "original_height": int(height), "image_rotation": 0, "score": _score(score)}
        if kind == "brush":
            if not mask.any():
                continue
            regions.append({"id": f"i{k}", **base,
                            "value": {"format": "rle", "rle": brush_rle.encode(mask), tag: [label]}})
            continue
        for j, flat in enumerate(mask_to_polygons(mask, min_points=3)):
            points = [[round(flat[i] / width * 100, 4), round(flat[i + 1] / height * 100, 4)]
                      for i in range(0, len(flat), 2)]
            regions.append({"id": f"i{k}p{j}", **base, "value": {"points": points, "closed": True, tag: [label]}})
    return regions


def task(uri: str, width: int, height: int, instances: Iterable[Mapping[str, Any]], labels: Sequence[str], *,
         model_version: str, kind: str = "brush", min_score: float = 0.0, local_files_root: str = "/",
         data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One Label Studio task: the image (:func:`image_reference`) and its URI in ``data`` (plus
    ``data``'s extra fields), and one prediction of ``model_version`` with the instances' regions."""
    regions = prediction_regions(instances, width, height, labels, kind=kind, min_score=min_score)
    prediction: dict[str, Any] = {"model_version": model_version, "result": regions}
    if regions:
        prediction["score"] = min(r["score"] for r in regions)
    return {"data": {TO_NAME: image_reference(uri, local_files_root), "uri": uri, **(data or {})},
            "predictions": [prediction]}
