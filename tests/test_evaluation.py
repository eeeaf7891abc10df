"""instseg_core.evaluation: COCO mask/box AP on real reference data, both backends."""

import copy
import json
from pathlib import Path

import pytest

from instseg_core.evaluation import (STAT_KEYS, EvaluationError, ap_summary_lines, evaluate_coco, summary_text)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPES = DATA / "coco_eval_shapes"
MINI8 = DATA / "coco_tiny_val2017" / "annotations" / "instances_val2017_mini8.json"
BACKENDS = ["pycocotools", pytest.param("faster", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("faster_coco_eval") is None, reason="faster-coco-eval not installed"))]

needs_data = pytest.mark.skipif(not SHAPES.is_dir() or not MINI8.is_file(), reason="../shared/data not present")


def _reference() -> dict:
    ref = json.loads((SHAPES / "reference_stats.json").read_text())["faster_coco_eval_shapes"]
    return ref["pycocotools_2.0.11_rerun_here"]


def _gt_as_results(gt: dict, with_bbox: bool) -> list[dict]:
    """Every non-crowd annotation as a score-1 detection with an RLE mask."""
    from pycocotools import mask as mask_utils

    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    out = []
    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], *sizes[ann["image_id"]]))
        res = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
               "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}
        if with_bbox:
            res["bbox"] = ann["bbox"]
        out.append(res)
    return out


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_stats(backend):
    ref = _reference()
    out = evaluate_coco(SHAPES / "gt_dataset.json", str(SHAPES / "dt_dataset_segm_rle_nobbox.json"), backend=backend)
    assert list(out) == ["segm", "bbox"]
    assert out["segm"] == ref["segm__dt_dataset_segm_rle_nobbox.json"]  # exact
    assert all(type(v) is float for v in out["segm"].values())
    assert list(out["segm"]) == list(STAT_KEYS)
    # mask-only results: boxes come from the masks; here they equal the raw dt boxes' numbers
    assert out["bbox"] == ref["bbox__dt_dataset.json_raw"]
    # the raw file (polygons + bbox): segm still uses mask areas (PaddleDetection's way), bbox its boxes
    raw = evaluate_coco(str(SHAPES / "gt_dataset.json"), SHAPES / "dt_dataset.json", backend=backend)
    assert raw["segm"] == ref["segm__dt_dataset_segm_rle_nobbox.json"]
    assert raw["bbox"] == ref["bbox__dt_dataset.json_raw"]


@needs_data
def test_inputs_not_modified_and_list_input_matches_file():
    gt = json.loads((SHAPES / "gt_dataset.json").read_text())
    dt = json.loads((SHAPES / "dt_dataset.json").read_text())
    gt0, dt0 = copy.deepcopy(gt), copy.deepcopy(dt)
    out = evaluate_coco(gt, dt)
    assert gt == gt0 and dt == dt0
    assert out == evaluate_coco(SHAPES / "gt_dataset.json", SHAPES / "dt_dataset.json")


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_crowd_ground_truth_perfect_results(backend):
    gt = json.loads(MINI8.read_text())
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 2  # crowd RLE (uncompressed counts) in the gt
    out = evaluate_coco(MINI8, _gt_as_results(gt, with_bbox=True), backend=backend)
    assert out["segm"]["AP"] == 1.0 and out["bbox"]["AP"] == 1.0
    assert out["segm"]["AR100"] == 1.0 and out["bbox"]["AR100"] == 1.0
    # masks only: segm is still perfect; boxes derived from the rasterised masks are close, not exact
    mask_only = evaluate_coco(gt, _gt_as_results(gt, with_bbox=False), backend=backend)
    assert mask_only["segm"]["AP"] == 1.0
    assert 0.95 < mask_only["bbox"]["AP"] < 1.0


@needs_data
def test_backends_agree_on_imperfect_results():
    gt = json.loads(MINI8.read_text())
    res = _gt_as_results(gt, with_bbox=False)
    for k, r in enumerate(res):  # shuffle scores and drop some detections
        r["score"] = ((k * 37) % 11) / 10.0
    res = [r for k, r in enumerate(res) if k % 4]
    a = evaluate_coco(gt, res, backend="pycocotools")
    pytest.importorskip("faster_coco_eval")
    b = evaluate_coco(gt, res, backend="faster")
    assert a == b
    assert 0 < a["segm"]["AP"] < 1


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results(backend, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    for results in ([], tmp_path / "empty.json"):
        out = evaluate_coco(SHAPES / "gt_dataset.json", results, backend=backend)
        for stats in out.values():
            # 0 where the gt has objects, -1 where it has none (no small objects in these images)
            assert stats == {k: (-1.0 if k.endswith("_small") else 0.0) for k in STAT_KEYS}


@needs_data
def test_errors_name_the_problem():
    gt = json.loads((SHAPES / "gt_dataset.json").read_text())
    res = json.loads((SHAPES / "dt_dataset_segm_rle_nobbox.json").read_text())
    with pytest.raises(EvaluationError, match=r"image_id\(s\) not in the ground truth: 12345, 999"):
        evaluate_coco(gt, res + [dict(res[0], image_id=999), dict(res[0], image_id=12345)])
    with pytest.raises(EvaluationError, match=r"category_id\(s\) not in the ground truth: 77"):
        evaluate_coco(gt, res + [dict(res[0], category_id=77)])
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} | {"bbox": [1, 2, 3, 4]} for r in res]
    with pytest.raises(EvaluationError, match="has no 'segmentation'"):
        evaluate_coco(gt, boxes_only)
    assert evaluate_coco(gt, boxes_only, iou_types=("bbox",))["bbox"]["AP"] >= 0  # box-only detectors
    bad_size = dict(res[0], segmentation={"size": [10, 10], "counts": "0"})
    with pytest.raises(EvaluationError, match=r"mask size \[10, 10\] differs"):
        evaluate_coco(gt, [bad_size])
    with pytest.raises(EvaluationError, match="has no 'score'"):
        evaluate_coco(gt, [{k: v for k, v in res[0].items() if k != "score"}])
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate_coco(gt, res, backend="nope")
    with pytest.raises(ValueError, match="unknown iou type"):
        evaluate_coco(gt, res, iou_types=("keypoints",))
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_coco(SHAPES / "missing.json", res)


def test_faster_backend_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("faster_coco_eval"):
            raise ImportError("No module named 'faster_coco_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        evaluate_coco({"images": [], "annotations": [], "categories": []}, [], backend="faster")


@needs_data
def test_quiet_by_default_and_summary_matches_pycocotools(capsys):
    out = evaluate_coco(SHAPES / "gt_dataset.json", SHAPES / "dt_dataset_segm_rle_nobbox.json", iou_types=("segm",))
    assert capsys.readouterr().out == ""
    evaluate_coco(SHAPES / "gt_dataset.json", SHAPES / "dt_dataset_segm_rle_nobbox.json", iou_types=("segm",),
                  verbose=True)
    printed = capsys.readouterr().out.splitlines()
    lines = ap_summary_lines(out["segm"])
    assert len(lines) == 12 and printed[-12:] == lines  # pycocotools' own summarize() text
    assert lines[0] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.695"
    assert ap_summary_lines([out["segm"][k] for k in STAT_KEYS]) == lines
    text = summary_text(out)
    assert text.splitlines()[0] == "IoU metric: segm" and text.splitlines()[1:] == lines


@needs_data
def test_ground_truth_on_s3(s3_bucket, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).put_object(
        Bucket=s3_bucket, Key="ds/annotations/gt.json", Body=(SHAPES / "gt_dataset.json").read_bytes())
    boto3.client("s3", endpoint_url=s3_server).put_object(
        Bucket=s3_bucket, Key="ds/dt.json", Body=(SHAPES / "dt_dataset_segm_rle_nobbox.json").read_bytes())
    out = evaluate_coco(f"s3://{s3_bucket}/ds/annotations/gt.json", f"s3://{s3_bucket}/ds/dt.json")
    assert out["segm"] == _reference()["segm__dt_dataset_segm_rle_nobbox.json"]
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_coco(f"s3://{s3_bucket}/ds/annotations/missing.json", [])
