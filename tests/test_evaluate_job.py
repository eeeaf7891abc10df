"""jobs.evaluate: COCO AP of a model over a PaddleX-layout dataset, predicted on a real local Ray."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from instseg_core.evaluation import evaluate_coco  # noqa: E402
from instseg_core.structures import Instances  # noqa: E402
from pipelines.evaluate import (LabelMismatchError, check_labels, load_eval_dataset,  # noqa: E402
                                write_dataset_results)
from pipelines.rows import ok_row  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny_val2017"
MINI8 = DATA / "annotations" / "instances_val2017_mini8.json"
MODEL = "MaskRCNN-ResNet50-FPN"  # its tiny model's 80 labels are COCO's names, in category-id order
IMAGE_IDS = [404484, 119828, 5001]  # three real photos (crowd RLE in 5001), small ones first

pytestmark = pytest.mark.skipif(not MINI8.is_file(), reason="../shared/data not present")


def _make_dataset(root: Path, image_ids=IMAGE_IDS) -> Path:
    """<root>/ds/{images/, annotations/instance_{train,val}.json} from the real mini8 COCO subset."""
    gt = json.loads(MINI8.read_text())
    ds = root / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "annotations").mkdir()
    images = [img for img in gt["images"] if img["id"] in image_ids]
    for img in images:
        shutil.copy(DATA / "val2017" / img["file_name"], ds / "images" / img["file_name"])
    sub = {"images": images, "categories": gt["categories"],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in image_ids]}
    for split in ("train", "val"):
        (ds / "annotations" / f"instance_{split}.json").write_text(json.dumps(sub))
    return root



def _direct_results(model_dir: Path, ds_root: Path) -> list[dict]:
    """The in-process predictor over the same images, mapped to the dataset's ids."""
    from instseg_core import create_model
    from instseg_core.inputs import decode_image_bytes

    ds = load_eval_dataset(str(ds_root), "val")
    model = create_model(model_dir=str(model_dir), threshold=0.0)
    out = []
    for uri, ids in ds.uri_to_ids.items():
        inst = model.predict_arrays([decode_image_bytes(Path(uri).read_bytes(), uri)])[0]
        for rle, box, score, cid in zip(inst.rle_masks(), inst.boxes, inst.scores, inst.class_ids):
            x1, y1, x2, y2 = (float(v) for v in box)
            f32 = lambda v: float(str(np.float32(v)))  # noqa: E731 - the exports' float32 rounding
            out.append({"image_id": ids[0], "category_id": ds.category_ids[int(cid)], "segmentation": rle,
                        "bbox": [f32(x1), f32(y1), f32(x2 - x1), f32(y2 - y1)], "score": f32(score)})
    return out


def _key(r: dict) -> tuple:
    return (r["image_id"], r["category_id"], r["segmentation"]["counts"], r["score"], tuple(r["bbox"]))


def test_job_ap_equals_direct_evaluation(ray_local, tiny_model_dirs, tmp_path):
    from jobs.evaluate import main

    model_dir = tiny_model_dirs(MODEL)
    root = _make_dataset(tmp_path)
    out = tmp_path / "eval"
    argv = ["--model-dir", str(model_dir), "--dataset-dir", str(root), "--output", str(out),
            "--batch-size", "1", "--progress-interval-s", "1"]
    assert main(argv) == 0

    result = json.loads((out / "evaluate_result.json").read_text())
    assert result["done_flag"] is True
    ap = result["metrics"]["AP"]
    assert isinstance(ap, float) and 0.0 <= ap <= 1.0
    assert result["images"] == result["images_predicted"] == len(IMAGE_IDS) and result["images_failed"] == 0
    assert result["threshold"] == 0.0 and result["label_mismatch"] == []

    direct = _direct_results(model_dir, root)
    job = json.loads((out / "coco_results.json").read_text())
    assert len(job) == result["detections"] == len(direct) > 0
    assert sorted(map(_key, job)) == sorted(map(_key, direct))  # same detections, same (gt) ids
    stats = evaluate_coco(str(root / "ds" / "annotations" / "instance_val.json"), direct)
    assert result["metrics"]["segm"] == stats["segm"] and result["metrics"]["bbox"] == stats["bbox"]
    assert ap == stats["segm"]["AP"]

    # a rerun with the same output resumes (nothing predicted again) and gives the same numbers
    assert main(argv) == 0
    again = json.loads((out / "evaluate_result.json").read_text())
    assert again["metrics"] == result["metrics"]
    summary = json.loads((out / "predictions" / "summary.json").read_text())
    assert summary["images_this_run"] == 0 and summary["images_before_this_run"] == len(IMAGE_IDS)

    # ... but not with other settings: predictions of another threshold must not be mixed in
    assert main(argv + ["--threshold", "0.5"]) == 2  # a settings error, before any Ray work
    failed = json.loads((out / "evaluate_result.json").read_text())
    assert failed["done_flag"] is False and "threshold" in failed["err_msg"]


def test_label_count_mismatch_is_a_clear_error(ray_local, tiny_model_dirs, tmp_path):
    from jobs.evaluate import main

    root = _make_dataset(tmp_path)
    ann = root / "ds" / "annotations" / "instance_val.json"
    gt = json.loads(ann.read_text())
    gt["categories"] = gt["categories"][:79]
    ann.write_text(json.dumps(gt))
    with pytest.raises(LabelMismatchError, match="the model has 80 labels but .* has 79 categories"):
        check_labels([f"c{i}" for i in range(80)], load_eval_dataset(str(root), "val"))
    # the job fails before any Ray work, with PaddleX's failure record
    out = tmp_path / "eval"
    assert main(["--model-dir", str(tiny_model_dirs(MODEL)), "--dataset-dir", str(root), "--output", str(out)]) == 2
    failed = json.loads((out / "evaluate_result.json").read_text())
    assert failed == {"done_flag": False, "err_type": "LabelMismatchError", "err_msg": failed["err_msg"]}
    assert "80 labels" in failed["err_msg"]


def test_same_count_other_names_maps_by_position(tmp_path):
    root = _make_dataset(tmp_path)
    ds = load_eval_dataset(str(root), "val")
    labels = list(ds.category_names)
    labels[3] = "motorbike"
    diff = check_labels(labels, ds)
    assert diff == [{"class_id": 3, "label": "motorbike", "category_id": ds.category_ids[3],
                     "category": ds.category_names[3]}]


def test_mapping_of_perfect_rows_gives_ap_1(tmp_path):
    """Rows as the pipeline writes them (hashed image ids, class indices) map onto the gt's
    image ids and its non-contiguous category ids: the ground truth as predictions scores 1.0."""
    from pycocotools import mask as mask_utils

    root = _make_dataset(tmp_path, image_ids=[a["id"] for a in json.loads(MINI8.read_text())["images"]])
    ds = load_eval_dataset(str(root), "val")
    assert ds.category_ids[-1] == 90  # COCO's ids have gaps: index != id - 1
    index_of = {cid: k for k, cid in enumerate(ds.category_ids)}
    labels = ds.category_names
    rows = []
    by_image = {img["id"]: img for img in ds.gt["images"]}
    for uri, (image_id,) in ds.uri_to_ids.items():
        img = by_image[image_id]
        anns = [a for a in ds.gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        rles = []
        for a in anns:
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], img["height"], img["width"]))
            rles.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        inst = Instances(np.array(boxes, np.float32).reshape(-1, 4), np.ones(len(anns)),
                         [index_of[a["category_id"]] for a in anns], rles, (img["height"], img["width"]))
        rows.append(ok_row(uri, inst, labels, "run", MODEL))
    rows.append(ok_row(str(tmp_path / "elsewhere.jpg"), Instances.empty((4, 4)), labels, "run", MODEL))  # not in gt
    out = tmp_path / "coco_results.json"
    n = write_dataset_results(rows, ds, labels, str(out))
    results = json.loads(out.read_text())
    assert n == len(results) == sum(1 for a in ds.gt["annotations"] if not a["iscrowd"])
    assert {r["image_id"] for r in results} <= set(by_image)
    stats = evaluate_coco(ds.gt, results)
    assert stats["segm"]["AP"] == 1.0
    assert stats["bbox"]["AP"] > 0.99  # boxes went through float32


def test_dataset_on_s3(s3_bucket, s3_server, tmp_path):
    """An s3:// dataset: root found under the prefix, annotations read, image URIs on S3."""
    import boto3

    root = _make_dataset(tmp_path)
    client = boto3.client("s3", endpoint_url=s3_server)
    for p in (root / "ds").rglob("*"):
        if p.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"data/{p.relative_to(root).as_posix()}", Body=p.read_bytes())
    ds = load_eval_dataset(f"s3://{s3_bucket}/data", "val")
    assert ds.root == f"s3://{s3_bucket}/data/ds"
    assert sorted(ds.uri_to_ids) == sorted(f"s3://{s3_bucket}/data/ds/images/{img['file_name']}"
                                           for img in ds.gt["images"])
    assert sorted(i for ids in ds.uri_to_ids.values() for i in ids) == sorted(IMAGE_IDS)
    from instseg_core.datasets.coco import DatasetError

    client.delete_object(Bucket=s3_bucket, Key="data/ds/annotations/instance_val.json")
    with pytest.raises(DatasetError, match="instance_val.json not found"):
        load_eval_dataset(f"s3://{s3_bucket}/data", "val")
