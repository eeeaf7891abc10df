"""Evaluation on Ray: COCO mask and box AP of a model over a dataset in PaddleX's layout.

    <dataset_dir>/**/<root>/images/<file_name>      (local, or an s3:// prefix)
    <root>/annotations/instance_<split>.json

Steps: the split's images (from its annotation file) become a manifest for the batch-labelling
pipeline (:func:`pipelines.batch_predict.run_batch_predict`: actor pool, Parquet parts, resume),
written under ``<output>/predictions/``; its rows are mapped to the dataset's image ids (by the
image's URI, built from ``file_name``) and category ids (model class index ``k`` -> the ``k``-th
dataset category sorted by id, as PaddleDetection's ``clsid2catid``), written as
``<output>/coco_results.json``, and scored once with :func:`instseg_core.evaluation.evaluate_coco`.
``<output>/evaluate_result.json`` follows PaddleX (``{"done_flag": true, "metrics": {"AP": mask AP}}``)
and adds the full ``segm`` and ``bbox`` stats, per-category AP (``per_category``) and run details;
``<output>/pr_curves_segm.png`` and ``pr_curves_bbox.png`` draw each category's precision/recall
curves (:mod:`instseg_core.pr_curves`).

* **Threshold**: 0.0 by default, not the model's ``draw_threshold``: AP integrates over the whole
  score range, so low-score detections count (PaddleDetection evaluates every detection its
  post-processing keeps; box models drop only the zero-score padding rows at 0.0).
* **Labels**: the model's label list (``inference.yml``) must have as many entries as the dataset
  has categories, else :class:`LabelMismatchError`; equal counts with different names are mapped
  by position with a warning (listed under ``label_mismatch`` in the result).
* **Failed images** (unreadable, undecodable) have no detections: they count as misses, and the
  result records ``images_failed`` and the errors by kind.
* **Rerun with the same output** resumes (images already predicted are skipped) only when the
  model, threshold, labels and annotation file are the same as the run that wrote them (recorded
  in ``predictions/evaluate_inputs.json``); otherwise it is an error rather than a silent mix.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from instseg_core.datasets.coco import ANNOTATION_FILES, DatasetError
from instseg_core.io import S3Options, fsspec_fs, is_remote, join, redact, write_bytes_atomic
from pipelines.settings import PredictionSettings

log = logging.getLogger("instseg")

RESULT_FILE = "evaluate_result.json"
PR_CURVES_FILE = "pr_curves_{}.png"  # per IoU type
RESULTS_FILE = "coco_results.json"
PREDICTIONS_DIR = "predictions"
INPUTS_FILE = "evaluate_inputs.json"
MANIFEST_FILE = "images.txt"


class LabelMismatchError(ValueError):
    """The model's label list cannot be mapped onto the dataset's categories."""


@dataclass(kw_only=True)
class EvaluateConfig(PredictionSettings):
    """An evaluation run; ``jobs.evaluate`` fills it from flags. The prediction settings are
    :class:`~pipelines.settings.PredictionSettings`'s, handed to the batch-labelling run as they are;
    the threshold defaults to 0.0 (see the module doc)."""

    dataset_dir: str
    output: str
    split: str = "val"
    threshold: float | None = 0.0
    backend: str = "pycocotools"  # or "faster" (faster-coco-eval)


# ---------------------------------------------------------------- the dataset


@dataclass
class EvalDataset:
    root: str  # local absolute path or URI of the folder holding images/ and annotations/
    annotation_uri: str
    gt: dict[str, Any]
    uri_to_ids: dict[str, list[int]]  # image URI -> the gt image ids with that file
    category_ids: list[int]  # sorted
    category_names: list[str]


def load_eval_dataset(dataset_dir: str, split: str, s3: S3Options | None = None) -> EvalDataset:
    """Find the dataset root (local or remote), read the split's annotations, list its image URIs."""
    from instseg_core.datasets.coco import annotation_path, find_dataset_root, load_coco

    if split not in ANNOTATION_FILES:
        raise DatasetError(f"unknown split {split!r}; expected one of {sorted(ANNOTATION_FILES)}")
    if is_remote(dataset_dir):
        from pipelines.validate import find_remote_root

        root = find_remote_root(dataset_dir, s3)
        ann_uri = join(root, "annotations", ANNOTATION_FILES[split])
        try:
            with fsspec_fs(ann_uri, s3).open(ann_uri, "rb") as f:
                gt = json.load(f)
        except FileNotFoundError:
            raise DatasetError(f"annotation file {redact(ann_uri)} not found") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"annotation file {redact(ann_uri)} is not valid JSON: {e}") from None
        if not isinstance(gt, dict):
            raise DatasetError(f"annotation file {redact(ann_uri)} must hold a JSON object")
    else:
        root = os.path.abspath(find_dataset_root(dataset_dir))
        ann_uri = str(annotation_path(root, split))
        gt = load_coco(ann_uri)
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise DatasetError(f"annotation file {redact(ann_uri)} has no list under {key!r}")
    if not gt["images"]:
        raise DatasetError(f"annotation file {redact(ann_uri)} lists no images")
    uri_to_ids: dict[str, list[int]] = {}
    for img in gt["images"]:
        name = str(img.get("file_name", ""))
        if not name or "\n" in name or "\r" in name:
            raise DatasetError(f"{redact(ann_uri)}: image {img.get('id')} has an unusable file_name {name!r}")
        uri = (join(root, "images", name) if is_remote(root)
               else os.path.normpath(os.path.join(root, "images", name)))
        uri_to_ids.setdefault(uri, []).append(int(img["id"]))
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    return EvalDataset(root=root, annotation_uri=ann_uri, gt=gt, uri_to_ids=uri_to_ids,
                       category_ids=[int(c["id"]) for c in cats], category_names=[str(c.get("name")) for c in cats])


def check_labels(labels: list[str], ds: EvalDataset) -> list[dict[str, Any]]:
    """Model labels vs dataset categories (sorted by id): a count mismatch is an error; returns the
    positions whose names differ (mapped by position anyway)."""
    if len(labels) != len(ds.category_ids):
        raise LabelMismatchError(
            f"the model has {len(labels)} labels but {redact(ds.annotation_uri)} has {len(ds.category_ids)} "
            f"categories; class k is scored as the k-th category by id, so the counts must match "
            f"(model: {labels[:5]}..., dataset: {ds.category_names[:5]}...)")
    diff = [{"class_id": k, "label": a, "category_id": cid, "category": b}
            for k, (a, b, cid) in enumerate(zip(labels, ds.category_names, ds.category_ids)) if a != b]
    if diff:
        log.warning("%d of %d model labels differ from the dataset's category names (mapped by position), "
                    "e.g. %s", len(diff), len(labels), diff[:3])
    return diff


def write_dataset_results(rows: Iterable[dict[str, Any]], ds: EvalDataset, labels: list[str], out_uri: str,
                          s3: S3Options | None = None) -> int:
    """COCO results of pipeline rows with the dataset's ids: image by URI, class k -> k-th category by
    id. Rows of images not in the dataset are left out (with a warning). Returns the detections."""
    from pipelines.writers import write_coco_results

    unmapped: list[str] = []

    def gt_ids(row: Mapping[str, Any]) -> list[int]:
        ids = ds.uri_to_ids.get(row["uri"])
        if ids is None:
            unmapped.append(row["uri"])
            return []
        return ids

    n = write_coco_results(rows, out_uri, labels, category_ids=ds.category_ids, image_ids=gt_ids, s3=s3)
    if unmapped:
        log.warning("%d predicted image(s) are not in %s and were left out, e.g. %s", len(unmapped),
                    redact(ds.annotation_uri), [redact(u) for u in unmapped[:3]])
    return n


# ---------------------------------------------------------------- resume safety


def _inputs_record(cfg: EvaluateConfig, labels: list[str], model_name: str | None, ds: EvalDataset) -> dict:
    record: dict[str, Any] = {"model_name": model_name, "model_dir": redact(cfg.model_dir) if cfg.model_dir else None,
                              "labels": labels, "threshold": cfg.threshold, "split": cfg.split,
                              "annotations": redact(ds.annotation_uri)}
    if cfg.model_dir and not is_remote(cfg.model_dir):
        params = os.path.join(cfg.model_dir, "inference.pdiparams")
        if os.path.isfile(params):
            st = os.stat(params)
            record["params_file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return record


def _check_resume(pred_dir: str, record: dict, s3: S3Options) -> bool:
    """Refuse to mix predictions of other settings into ``pred_dir``; True when ``record`` is new
    there (the caller writes it once the rest of the settings are checked)."""
    from pipelines.sinks import list_parts

    uri = join(pred_dir, INPUTS_FILE)
    fs = fsspec_fs(uri, s3)
    previous = None
    if fs.exists(uri):
        with fs.open(uri, "rb") as f:
            previous = json.load(f)
    if list_parts(pred_dir, s3):
        if previous != record:
            changed = sorted(k for k in set(record) | set(previous or {})
                             if (previous or {}).get(k) != record.get(k))
            raise ValueError(f"{redact(pred_dir)} already holds predictions of a different run "
                             f"(differs in: {changed or 'no record'}); use a new --output or remove that folder")
        log.info("resuming: predictions already under %s are reused", redact(pred_dir))
    return previous != record


# ---------------------------------------------------------------- the run


@dataclass
class EvaluationPlan:
    """What :func:`prepare_evaluation` checked and wrote before any Ray work."""

    dataset: EvalDataset
    labels: list[str]
    label_mismatch: list[dict[str, Any]]
    predict: Any  # pipelines.batch_predict.BatchPredictConfig of the prediction run
    predict_plan: Any  # pipelines.batch_predict.JobPlan


def prepare_evaluation(cfg: EvaluateConfig) -> EvaluationPlan:
    """Everything that can fail because of a user's setting, before Ray starts: the dataset and its
    annotation file, the model, labels against categories, a rerun's settings against the first
    run's, the prediction settings. Raises ``ValueError`` subclasses (:class:`DatasetError` is one
    is wrapped in :class:`pipelines.batch_predict.JobSettingsError`) with one-line messages."""
    from pipelines.batch_predict import BatchPredictConfig, JobSettingsError, check_settings, storage_errors
    from pipelines.model_source import validate_model_source
    from pipelines.sinks import write_json

    s3 = cfg.s3()
    cfg.absolute_paths("dataset_dir", "output")
    if not cfg.model_name and not cfg.model_dir:
        raise JobSettingsError("give a model name or a model dir")
    if cfg.backend not in ("pycocotools", "faster"):
        raise JobSettingsError(f"backend must be 'pycocotools' or 'faster', got {cfg.backend!r}")
    with storage_errors("dataset", cfg.dataset_dir):
        try:
            ds = load_eval_dataset(cfg.dataset_dir, cfg.split, s3)
        except DatasetError as e:
            raise JobSettingsError(f"dataset: {e}") from None
    with storage_errors("model", cfg.model_dir or ""):
        try:
            source = validate_model_source(cfg.model_name, cfg.model_dir, s3)
        except (ValueError, OSError) as e:
            raise JobSettingsError(f"model: {e}") from None
    labels, model_name = source.labels, source.model_name
    label_mismatch = check_labels(labels, ds)
    pred_dir = join(cfg.output, PREDICTIONS_DIR)
    record = _inputs_record(cfg, labels, model_name, ds)
    with storage_errors("output", cfg.output):
        try:
            new_record = _check_resume(pred_dir, record, s3)
        except ValueError as e:
            raise JobSettingsError(str(e)) from None
    manifest = join(pred_dir, MANIFEST_FILE)
    write_bytes_atomic(manifest, "".join(u + "\n" for u in ds.uri_to_ids).encode("utf-8"), s3)
    pred_cfg = BatchPredictConfig(input=manifest, output=pred_dir, **cfg.prediction_settings())
    predict_plan = check_settings(pred_cfg)
    if new_record:
        write_json(join(pred_dir, INPUTS_FILE), record, s3)
    return EvaluationPlan(dataset=ds, labels=labels, label_mismatch=label_mismatch, predict=pred_cfg,
                          predict_plan=predict_plan)


def evaluate_with_ray(cfg: EvaluateConfig, plan: EvaluationPlan | None = None) -> dict[str, Any]:
    """Predict the split's images on Ray, score them, write the result files; returns the result.
    ``plan`` is :func:`prepare_evaluation`'s result when the caller already prepared the run."""
    from instseg_core.evaluation import evaluate_coco_curves, summary_text
    from instseg_core.pr_curves import pr_curves_png
    from pipelines.batch_predict import run_batch_predict
    from pipelines.writers import EXPORT_COLUMNS, iter_rows
    from pipelines.sinks import list_parts, write_json

    started = time.time()
    s3 = cfg.s3()
    plan = plan or prepare_evaluation(cfg)
    ds, labels, pred_cfg = plan.dataset, plan.labels, plan.predict
    log.info("evaluating %s on %s (%s: %d images, %d annotations, %d categories)",
             cfg.model_name or redact(cfg.model_dir or ""), redact(ds.root), cfg.split, len(ds.gt["images"]),
             len(ds.gt["annotations"]), len(ds.category_ids))
    summary = run_batch_predict(pred_cfg, plan.predict_plan)
    pred_dir = pred_cfg.output

    results_uri = join(cfg.output, RESULTS_FILE)
    rows = iter_rows(list_parts(pred_dir, s3), EXPORT_COLUMNS, s3=s3)
    n_dets = write_dataset_results(rows, ds, labels, results_uri, s3)
    with fsspec_fs(results_uri, s3).open(results_uri, "rb") as f:
        results = json.load(f)
    stats, curves = evaluate_coco_curves(ds.gt, results, iou_types=("segm", "bbox"), backend=cfg.backend)
    names = dict(zip(ds.category_ids, ds.category_names))
    aps = {t: c.category_ap() for t, c in curves.items()}  # None: no ground truth of that category
    per_category = [{"category_id": cid, "name": names[cid], **{f"{t}_AP": aps[t][cid] for t in aps}}
                    for cid in ds.category_ids]
    for iou_type, c in curves.items():
        png = pr_curves_png(c, names, f"precision / recall ({iou_type}), {len(ds.gt['images'])} images")
        write_bytes_atomic(join(cfg.output, PR_CURVES_FILE.format(iou_type)), png, s3)
    log.info("COCO evaluation of %d detections on %d images:\n%s", n_dets, len(ds.gt["images"]),
             summary_text(stats))

    failed = summary["by_status"].get("error", 0)
    if failed:
        log.warning("%d image(s) could not be predicted and count as misses: %s", failed, summary["errors_by_kind"])
    result = {
        "done_flag": True,
        "metrics": {"AP": stats["segm"]["AP"], "segm": stats["segm"], "bbox": stats["bbox"]},
        "per_category": per_category, "pr_curves": [PR_CURVES_FILE.format(t) for t in curves],
        "model": pred_cfg.model_label, "dataset": redact(ds.root), "split": cfg.split,
        "annotations": redact(ds.annotation_uri), "threshold": cfg.threshold, "backend": cfg.backend,
        "images": len(ds.gt["images"]), "images_predicted": summary["images_written"],
        "images_failed": failed, "errors_by_kind": summary["errors_by_kind"], "detections": n_dets,
        "coco_results": RESULTS_FILE, "predictions": PREDICTIONS_DIR, "label_mismatch": plan.label_mismatch,
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(join(cfg.output, RESULT_FILE), result, s3)
    return result
