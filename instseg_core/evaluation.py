"""COCO instance-segmentation evaluation (mask and box AP), as PaddleDetection's ``COCOMetric`` scores.

    from instseg_core.evaluation import evaluate_coco, ap_summary_lines

    stats = evaluate_coco("annotations/instance_val.json", results)   # {"segm": {...}, "bbox": {...}}
    print("\\n".join(ap_summary_lines(stats["segm"])))

``gt``: a COCO dataset dict, or a path / fsspec URL (``s3://bucket/ds/annotations/instance_val.json``)
of one. ``results``: a list of COCO result dicts ``{"image_id", "category_id", "score",
"segmentation" (RLE; polygons and uncompressed RLE are converted), "bbox" [x, y, w, h]}``, or a path /
URL of such a JSON list. Neither input is modified.

Each IoU type gives pycocotools' 12 numbers under :data:`STAT_KEYS` (python floats; -1 where
pycocotools gives -1: no ground truth in that area range). ``backend="faster"`` runs
faster-coco-eval instead of pycocotools with the same inputs and gives the same numbers.

How results are read (decisions; pycocotools' ``loadRes`` is not used):

* **segm** uses each result's mask: its area (for the small/medium/large ranges) is the mask's
  pixel count even when a ``bbox`` is present. This is what PaddleDetection does (its segm results
  carry no bbox) and what faster-coco-eval's reference numbers assume; ``loadRes`` on a list whose
  first item has a bbox would take the box area instead. A result without ``segmentation`` is an
  error (evaluate with ``iou_types=("bbox",)`` for box-only detectors).
* **bbox** uses each result's ``bbox`` (area ``w * h``); a result without one gets the tight box of
  its mask (``pycocotools.mask.toBbox``, as ``loadRes`` does for RLE results), so mask-only
  results are scored on both types.
* **Empty results** (an empty list or file): no crash (``loadRes`` raises on ``[]``); every
  number is 0 where the ground truth has objects in that range and -1 where it has none, which is
  what pycocotools' own accumulate gives for "no detections".
* A result whose ``image_id`` or ``category_id`` is not in ``gt`` raises :class:`EvaluationError`
  naming them (``loadRes`` only asserts; unknown categories would be silently ignored). So does a
  mask whose size differs from its image's, or a result missing ``score``.
* Ground truth: crowd annotations (``iscrowd: 1``, uncompressed RLE) are handled as pycocotools
  does (ignored regions); a missing ``iscrowd`` means 0, a missing ``area`` / ``bbox`` is computed
  from the segmentation. Duplicate annotation ids are an error (pycocotools would silently drop
  all but one).

pycocotools' progress prints are silenced unless ``verbose=True``.

:func:`evaluate_coco_curves` gives the same stats plus, per IoU type, the precision/recall curves
COCOeval accumulates (:class:`PRCurves`: per category, per IoU threshold; area ``all``, 100
detections), from which per-category AP is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from instseg_core.io import open_uri

__all__ = ["STAT_KEYS", "IOU_TYPES", "BACKENDS", "EvaluationError", "PRCurves", "evaluate_coco",
           "evaluate_coco_curves", "ap_summary_lines", "summary_text", "load_json"]

#: pycocotools' ``COCOeval.stats`` in order.
STAT_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
             "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
IOU_TYPES = ("segm", "bbox")
BACKENDS = ("pycocotools", "faster")

# (AP or AR, IoU threshold or None for 0.50:0.95, area range, max detections) per stat, as pycocotools
_SUMMARY_ROWS = ((1, None, "all", 100), (1, 0.5, "all", 100), (1, 0.75, "all", 100),
                 (1, None, "small", 100), (1, None, "medium", 100), (1, None, "large", 100),
                 (0, None, "all", 1), (0, None, "all", 10), (0, None, "all", 100),
                 (0, None, "small", 100), (0, None, "medium", 100), (0, None, "large", 100))


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (unknown image or category ids, malformed results...)."""


@dataclass(frozen=True)
class PRCurves:
    """Precision at each recall level, per IoU threshold and category, as COCOeval accumulates it
    (area range ``all``, at most 100 detections per image).

    ``precision[t, r, k]`` is the (interpolated) precision at ``recall[r]`` for IoU threshold
    ``iou_thresholds[t]`` and category ``category_ids[k]``; -1 where the category has no ground truth.
    """

    iou_type: str
    category_ids: list[int]
    recall: np.ndarray  # [R] 0.00, 0.01, ..., 1.00
    iou_thresholds: np.ndarray  # [T] 0.50, 0.55, ..., 0.95
    precision: np.ndarray  # [T, R, K]

    def category_ap(self) -> dict[int, float | None]:
        """AP (mean precision over IoU 0.50:0.95 and recall) per category id; None without ground truth.
        Their mean over categories with ground truth is the ``AP`` of :data:`STAT_KEYS`."""
        out: dict[int, float | None] = {}
        for k, cid in enumerate(self.category_ids):
            p = self.precision[:, :, k]
            out[cid] = float(p[p > -1].mean()) if (p > -1).any() else None
        return out

    def curve(self, category_id: int, iou: float | None = None) -> np.ndarray:
        """Precision over :attr:`recall` for one category: at IoU ``iou`` (one of
        :attr:`iou_thresholds`), or averaged over all of them when None; -1 entries stay -1."""
        p = self.precision[:, :, self.category_ids.index(category_id)]
        if iou is None:
            return np.where((p > -1).all(axis=0), p.mean(axis=0), -1.0)
        return p[int(np.argmin(np.abs(self.iou_thresholds - iou)))]


# ------------------------------------------------------------------------------------------ loading


def load_json(source: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Any:
    """Parse a JSON file from a local path or any fsspec URL (``s3://``...; S3 settings as
    :class:`instseg_core.io.S3Options` finds them, ``storage_options`` on top)."""
    src = os.fspath(source)
    try:
        with open_uri(src, "rb", **dict(storage_options or {})) as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvaluationError(f"{src} does not exist") from None
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{src} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def _loaded(source: Any, what: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """``source`` parsed when it is a path or URL, else as given; and the name messages call it by."""
    if isinstance(source, (str, os.PathLike)):
        return load_json(source, storage_options), os.fspath(source)
    return source, what


def _ids(values: Iterable[Any], limit: int = 10) -> str:
    vals = sorted(set(values), key=str)
    shown = ", ".join(str(v) for v in vals[:limit])
    return shown + (f" (and {len(vals) - limit} more)" if len(vals) > limit else "")


# ------------------------------------------------------------------------------------------ masks


def _to_rle(segm: Any, h: int | None, w: int | None, what: str) -> dict[str, Any]:
    """Compressed RLE (``counts`` as bytes, what pycocotools' C API takes) of any COCO segmentation."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, dict):
        counts, size = segm.get("counts"), segm.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise EvaluationError(f"{what}: RLE size {size!r} is not [height, width]")
        size = [int(size[0]), int(size[1])]
        if h is not None and w is not None and size != [h, w]:
            raise EvaluationError(f"{what}: mask size {size} differs from its image's [height, width] {[h, w]}")
        if isinstance(counts, list):  # uncompressed
            return mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
        if isinstance(counts, str):
            return {"size": size, "counts": counts.encode("ascii")}
        if isinstance(counts, bytes):
            return {"size": size, "counts": counts}
        raise EvaluationError(f"{what}: RLE counts must be a string or a list of integers")
    if isinstance(segm, list):
        if h is None or w is None:
            raise EvaluationError(f"{what}: polygons need the image's height and width in gt['images']")
        polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return mask_utils.encode(np.zeros((h, w, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    raise EvaluationError(f"{what}: segmentation must be an RLE dict or a list of polygons, "
                          f"not {type(segm).__name__}")


def _area_and_box(rle: dict[str, Any]) -> tuple[float, list[float]]:
    from pycocotools import mask as mask_utils

    return float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


# ------------------------------------------------------------------------------------------ inputs


def _gt_dataset(gt: Mapping[str, Any], iou_type: str, source: str) -> dict[str, Any]:
    """A shallow copy of ``gt`` whose annotations are fresh dicts with the fields COCOeval reads."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"{source}: ground truth must have a list under {key!r}")
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in gt["images"]}
    anns, seen = [], set()
    for k, ann in enumerate(gt["annotations"]):
        ann = dict(ann)
        if "id" not in ann:
            raise EvaluationError(f"{source}: annotation {k} has no 'id'")
        if ann["id"] in seen:
            raise EvaluationError(f"{source}: duplicate annotation id {ann['id']} (pycocotools keeps only one)")
        seen.add(ann["id"])
        ann.setdefault("iscrowd", 0)
        need_mask = "area" not in ann or (iou_type == "bbox" and "bbox" not in ann)
        if need_mask:
            if "segmentation" in ann:
                h, w = sizes.get(ann["image_id"], (None, None))
                area, box = _area_and_box(_to_rle(ann["segmentation"], h, w, f"{source}: annotation {ann['id']}"))
                ann.setdefault("area", area)
                ann.setdefault("bbox", box)
            elif "bbox" in ann:
                ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
            else:
                raise EvaluationError(f"{source}: annotation {ann['id']} has neither segmentation nor bbox")
        if iou_type == "segm" and "segmentation" not in ann:
            raise EvaluationError(f"{source}: annotation {ann['id']} has no segmentation (needed for segm)")
        anns.append(ann)
    out = {k: v for k, v in gt.items() if k != "annotations"}
    out["annotations"] = anns
    return out


def _dt_annotations(results: Sequence[Mapping[str, Any]], gt: Mapping[str, Any], iou_type: str,
                    source: str) -> list[dict[str, Any]]:
    """Result dicts as COCOeval reads them (``id``, ``area``, ``iscrowd``; RLE masks; boxes)."""
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in gt["images"]}
    anns: list[dict[str, Any]] = []
    for k, res in enumerate(results):
        what = f"{source}: result {k}"
        if not isinstance(res, Mapping):
            raise EvaluationError(f"{what} is a {type(res).__name__}, not a dict")
        for key in ("image_id", "category_id", "score"):
            if key not in res:
                raise EvaluationError(f"{what} has no {key!r}")
        ann = {"id": k + 1, "image_id": res["image_id"], "category_id": res["category_id"],
               "score": float(res["score"]), "iscrowd": 0}
        segm, box = res.get("segmentation"), res.get("bbox")
        if box is not None and len(box) == 0:
            box = None
        if iou_type == "segm":
            if segm is None:
                raise EvaluationError(f"{what} has no 'segmentation': segm evaluation needs masks "
                                      "(use iou_types=('bbox',) for box-only results)")
            h, w = sizes[res["image_id"]]
            rle = _to_rle(segm, h, w, what)
            area, mask_box = _area_and_box(rle)
            ann.update(segmentation=rle, area=area, bbox=mask_box if box is None else [float(v) for v in box])
        else:
            if box is None:
                if segm is None:
                    raise EvaluationError(f"{what} has neither 'bbox' nor 'segmentation'")
                h, w = sizes[res["image_id"]]
                _, box = _area_and_box(_to_rle(segm, h, w, what))
            if len(box) != 4:
                raise EvaluationError(f"{what}: bbox must be [x, y, w, h], got {box!r}")
            box = [float(v) for v in box]
            ann.update(bbox=box, area=box[2] * box[3])
        anns.append(ann)
    return anns


def _check_ids(results: Sequence[Mapping[str, Any]], gt: Mapping[str, Any], source: str) -> None:
    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    bad_img = {r.get("image_id") for r in results if isinstance(r, Mapping)} - img_ids
    if bad_img:
        raise EvaluationError(f"{source}: {len(bad_img)} image_id(s) not in the ground truth: {_ids(bad_img)} "
                              "(results must use the ground truth's image ids)")
    bad_cat = {r.get("category_id") for r in results if isinstance(r, Mapping)} - cat_ids
    if bad_cat:
        raise EvaluationError(f"{source}: {len(bad_cat)} category_id(s) not in the ground truth: {_ids(bad_cat)} "
                              f"(its categories are {_ids(cat_ids)})")


# ------------------------------------------------------------------------------------------ running


def _backend_classes(backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as e:
            raise ImportError("backend='faster' needs faster-coco-eval: pip install faster-coco-eval "
                              f"(or use backend='pycocotools'); import failed: {e}") from None
        return COCO, COCOeval_faster
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _coco(cls, dataset: dict[str, Any]):
    obj = cls()
    obj.dataset = dataset
    obj.createIndex()
    return obj


def _run_one(backend: str, gt_ds: dict[str, Any], dt_anns: list[dict[str, Any]], iou_type: str,
             verbose: bool) -> tuple[dict[str, float], PRCurves]:
    coco_cls, eval_cls = _backend_classes(backend)
    dt_ds = {"images": list(gt_ds["images"]), "categories": list(gt_ds["categories"]), "annotations": dt_anns}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt, coco_dt = _coco(coco_cls, gt_ds), _coco(coco_cls, dt_ds)
        if backend == "faster":
            ev = eval_cls(coco_gt, coco_dt, iouType=iou_type, print_function=print if verbose else _no_print)
        else:
            ev = eval_cls(coco_gt, coco_dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=np.float64)[: len(STAT_KEYS)]
    params = ev.params
    area_all, max_dets = list(params.areaRngLbl).index("all"), list(params.maxDets).index(100)
    curves = PRCurves(iou_type=iou_type, category_ids=[int(c) for c in params.catIds],
                      recall=np.asarray(params.recThrs, dtype=np.float64),
                      iou_thresholds=np.asarray(params.iouThrs, dtype=np.float64),
                      precision=np.asarray(ev.eval["precision"], dtype=np.float64)[:, :, :, area_all, max_dets])
    return {k: float(v) for k, v in zip(STAT_KEYS, stats)}, curves


def _no_print(*args: Any, **kwargs: Any) -> None:
    pass


def evaluate_coco(gt: str | os.PathLike[str] | Mapping[str, Any],
                  results: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
                  iou_types: Sequence[str] = IOU_TYPES, backend: str = "pycocotools", *,
                  verbose: bool = False,
                  storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """COCO stats of ``results`` against ``gt`` for each IoU type: ``{iou_type: {STAT_KEYS...}}``.

    See the module docstring for the accepted inputs and how edge cases are handled.
    ``storage_options`` go to ``fsspec.open`` for URL inputs (e.g. ``{"anon": True}``).
    """
    return evaluate_coco_curves(gt, results, iou_types, backend, verbose=verbose,
                                storage_options=storage_options)[0]


def evaluate_coco_curves(gt: str | os.PathLike[str] | Mapping[str, Any],
                         results: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
                         iou_types: Sequence[str] = IOU_TYPES, backend: str = "pycocotools", *,
                         verbose: bool = False, storage_options: Mapping[str, Any] | None = None
                         ) -> tuple[dict[str, dict[str, float]], dict[str, PRCurves]]:
    """:func:`evaluate_coco`'s stats and, per IoU type, its :class:`PRCurves` (one evaluation)."""
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"unknown iou type {t!r}; expected some of {IOU_TYPES}")
    _backend_classes(backend)  # fail on a bad or missing backend before any work

    gt, gt_src = _loaded(gt, "ground truth", storage_options)
    if not isinstance(gt, Mapping):
        raise EvaluationError(f"{gt_src}: ground truth must be a COCO dataset (a JSON object)")
    results, res_src = _loaded(results, "results", storage_options)
    if not isinstance(results, list):
        raise EvaluationError(f"{res_src}: results must be a JSON list of detections, not a {type(results).__name__}")

    for key in ("images", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"{gt_src}: ground truth must have a list under {key!r}")
    _check_ids(results, gt, res_src)
    out: dict[str, dict[str, float]] = {}
    curves: dict[str, PRCurves] = {}
    for iou_type in iou_types:
        gt_ds = _gt_dataset(gt, iou_type, gt_src)
        dt_anns = _dt_annotations(results, gt, iou_type, res_src)
        out[iou_type], curves[iou_type] = _run_one(backend, gt_ds, dt_anns, iou_type, verbose)
    return out, curves


# ------------------------------------------------------------------------------------------ text


def ap_summary_lines(stats: Mapping[str, float] | Sequence[float]) -> list[str]:
    """pycocotools' 12-line summary (``COCOeval.summarize`` output, character for character)."""
    values = [stats[k] for k in STAT_KEYS] if isinstance(stats, Mapping) else list(stats)
    if len(values) < len(STAT_KEYS):
        raise ValueError(f"expected {len(STAT_KEYS)} stats, got {len(values)}")
    lines = []
    for value, (ap, thr, area, max_dets) in zip(values, _SUMMARY_ROWS):
        title, kind = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
        iou = "0.50:0.95" if thr is None else f"{thr:0.2f}"
        lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
                     f"{value:0.3f}")
    return lines


def summary_text(result: Mapping[str, Mapping[str, float]]) -> str:
    """The summaries of an :func:`evaluate_coco` result, each under an ``IoU metric: <type>`` line."""
    parts = []
    for iou_type, stats in result.items():
        parts.append(f"IoU metric: {iou_type}")
        parts.extend(ap_summary_lines(stats))
    return "\n".join(parts)
