"""pipelines.writers: COCO results/dataset and LabelMe from Parquet part files (local and S3)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_core.masks import decode_rle, masks_to_xyxy
from instseg_core.structures import Instances
from pipelines import writers
from pipelines.rows import error_row, image_id_for, ok_row, rows_to_table

LABELS = ["person", "car"]
RUN, MODEL = "run-1", "tiny"
H, W = 48, 64


def _disk(cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _rect(y1: int, x1: int, y2: int, x2: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y1:y2, x1:x2] = True
    return m


def _instances(masks: list[np.ndarray], class_ids: list[int], scores: list[float]) -> Instances:
    if not masks:
        # RLE form: Instances.areas() of a dense [0, H, W] array fails (reshape of size 0)
        return Instances.empty((H, W)).to_rle()
    dense = np.stack(masks)
    return Instances(masks_to_xyxy(dense), scores, class_ids, dense, (H, W))


# image A: two overlapping objects, a two-blob mask, and an empty mask (lowest score)
A_URI = "/data/a/cat.jpg"
A_MASKS = [_disk(20, 20, 12), _rect(10, 22, 40, 50), _rect(2, 2, 12, 14) | _disk(36, 52, 9),
           np.zeros((H, W), dtype=bool)]
A = dict(masks=A_MASKS, class_ids=[0, 1, 1, 0], scores=[0.9, 0.8, 0.7, 0.05])
# image B: same stem as A, other directory (LabelMe name collision)
B_URI = "s3://src/b/cat.png"
B = dict(masks=[_disk(24, 32, 15)], class_ids=[1], scores=[0.6])
C_URI = "https://example.com/imgs/empty.jpg?sig=abc"  # no instances
D_URI = "/data/d/broken.jpg"  # error only
E_URI = "/data/e/retried.jpg"  # an error row, then an ok row (retry succeeded)
E = dict(masks=[_rect(5, 5, 30, 30)], class_ids=[0], scores=[0.95])

OK_URIS = [A_URI, B_URI, C_URI, E_URI]
EXPECTED = {A_URI: A, B_URI: B, C_URI: dict(masks=[], class_ids=[], scores=[]), E_URI: E}


def _rows() -> tuple[list[dict], list[dict]]:
    def ok(uri, spec):
        return ok_row(uri, _instances(**spec), LABELS, RUN, MODEL)

    dup_a = ok(A_URI, dict(masks=[_rect(0, 0, 5, 5)], class_ids=[0], scores=[0.99]))  # must lose to the first A
    part0 = [ok(A_URI, A), ok(B_URI, B), error_row(D_URI, "decode", "bad jpeg", RUN, MODEL),
             error_row(E_URI, "read", "timeout", RUN, MODEL)]
    part1 = [ok(C_URI, EXPECTED[C_URI]), dup_a, ok(E_URI, E)]
    return part0, part1


def _write_parts(base: str) -> list[str]:
    uris = []
    for i, rows in enumerate(_rows()):
        uri = f"{base.rstrip('/')}/parts/part-{i}.parquet"
        if "://" not in uri:
            os.makedirs(os.path.dirname(uri), exist_ok=True)
        with fsspec.open(uri, "wb") as f:
            pq.write_table(rows_to_table(rows), f)
        uris.append(uri)
    return uris


@pytest.fixture
def parts(tmp_path) -> list[str]:
    return _write_parts(str(tmp_path / "out"))


def _rows_iter(parts: list[str]):
    return writers.iter_rows(parts, writers.EXPORT_COLUMNS, batch_size=2)


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_iter_rows_streams_all_rows_and_columns(parts):
    rows = list(writers.iter_rows(parts, batch_size=1))
    assert [r["uri"] for r in rows] == [A_URI, B_URI, D_URI, E_URI, C_URI, A_URI, E_URI]
    assert rows[0]["run_id"] == RUN and rows[0]["instances"][0]["rle"]["size"] == [H, W]
    narrow = next(writers.iter_rows(parts, ["image_id", "status"]))
    assert narrow == {"image_id": image_id_for(A_URI), "status": "ok"}


def test_coco_results(parts, tmp_path):
    out = tmp_path / "out" / "coco_results.json"
    n = writers.write_coco_results(_rows_iter(parts), str(out), LABELS)
    dets = json.loads(out.read_text())
    assert n == len(dets) == 4 + 1 + 0 + 1  # error rows excluded, duplicate A once, retried E once
    assert _leftovers(out.parent) == []
    by_image: dict[int, list[dict]] = {}
    for d in dets:
        assert set(d) == {"image_id", "category_id", "segmentation", "bbox", "score"}
        assert isinstance(d["segmentation"]["counts"], str)
        by_image.setdefault(d["image_id"], []).append(d)
    assert set(by_image) == {image_id_for(u) for u in (A_URI, B_URI, E_URI)}
    for uri, spec in ((A_URI, A), (B_URI, B), (E_URI, E)):
        got = by_image[image_id_for(uri)]
        assert [d["category_id"] for d in got] == [c + 1 for c in spec["class_ids"]]
        assert [d["score"] for d in got] == spec["scores"]  # float32 written in shortest form
        np.testing.assert_array_equal(decode_rle([d["segmentation"] for d in got]), np.stack(spec["masks"]))
        boxes = masks_to_xyxy(np.stack(spec["masks"]))
        expected_xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        np.testing.assert_allclose([d["bbox"] for d in got], expected_xywh)


def test_coco_dataset_loads_and_evaluates_perfectly(parts, tmp_path):
    gt_path, dt_path = tmp_path / "out" / "coco_dataset.json", tmp_path / "out" / "coco_results.json"
    counts = writers.write_coco_dataset(_rows_iter(parts), str(gt_path), LABELS, info={"contributor": "test"})
    writers.write_coco_results(_rows_iter(parts), str(dt_path), LABELS)
    assert counts == {"images": 4, "annotations": 3 + 1 + 1}  # A's empty mask is no label
    assert _leftovers(gt_path.parent) == []

    data = json.loads(gt_path.read_text())
    assert data["licenses"] == [] and data["info"]["contributor"] == "test"
    assert data["categories"] == [{"id": 1, "name": "person", "supercategory": ""},
                                  {"id": 2, "name": "car", "supercategory": ""}]
    images = {im["uri"]: im for im in data["images"]}
    assert list(images) == OK_URIS
    assert images[A_URI] == {"id": image_id_for(A_URI), "file_name": "data/a/cat.jpg", "width": W, "height": H,
                             "uri": A_URI}
    assert images[B_URI]["file_name"] == "src/b/cat.png"
    assert images[C_URI]["file_name"] == "example.com/imgs/empty.jpg" and images[C_URI]["coco_url"] == C_URI
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4, 5]
    a0 = data["annotations"][0]
    assert a0["area"] == int(A_MASKS[0].sum()) and a0["iscrowd"] == 0 and a0["category_id"] == 1
    assert a0["score"] == 0.9

    gt = COCO(str(gt_path))
    assert sorted(gt.getImgIds()) == sorted(image_id_for(u) for u in OK_URIS)
    np.testing.assert_array_equal(gt.annToMask(gt.loadAnns(gt.getAnnIds(imgIds=[image_id_for(A_URI)]))[2]),
                                  A_MASKS[2])
    dt = gt.loadRes(str(dt_path))
    for iou_type in ("segm", "bbox"):
        ev = COCOeval(gt, dt, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type  # AP@[.5:.95]: predictions are the labels

    # min_score filters annotations, never images
    counts = writers.write_coco_dataset(_rows_iter(parts), str(gt_path), LABELS, min_score=0.75)
    assert counts == {"images": 4, "annotations": 3}
    assert {a["score"] for a in json.loads(gt_path.read_text())["annotations"]} == {0.9, 0.8, 0.95}


def _raster(shapes: list[dict]) -> np.ndarray:
    canvas = np.zeros((H, W), dtype=np.uint8)
    for s in shapes:
        cv2.fillPoly(canvas, [np.round(np.asarray(s["points"])).astype(np.int32)], 1)
    return canvas.astype(bool)


def test_labelme(parts, tmp_path):
    out = tmp_path / "out" / "labelme"
    assert writers.write_labelme(_rows_iter(parts), str(out)) == 4
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["cat.json", f"cat_{image_id_for(B_URI)}.json", "empty.json", "retried.json"])

    doc = json.loads((out / "cat.json").read_text())
    assert doc["version"] == "5.2.1" and doc["flags"] == {} and doc["imageData"] is None
    assert (doc["imageHeight"], doc["imageWidth"]) == (H, W)
    assert doc["imagePath"] == os.path.relpath(A_URI, out)
    shapes = doc["shapes"]
    assert [s["label"] for s in shapes] == ["person", "car", "car", "car"]  # empty mask: no shape
    assert all(s["shape_type"] == "polygon" and s["flags"] == {} and len(s["points"]) >= 3 for s in shapes)
    assert [s["description"] for s in shapes] == ["score=0.90", "score=0.80", "score=0.70", "score=0.70"]
    assert shapes[0]["group_id"] is None and shapes[1]["group_id"] is None
    assert shapes[2]["group_id"] == shapes[3]["group_id"] is not None  # two blobs, one object
    for got, mask in ((_raster(shapes[:1]), A_MASKS[0]), (_raster(shapes[1:2]), A_MASKS[1]),
                      (_raster(shapes[2:]), A_MASKS[2])):
        iou = (got & mask).sum() / (got | mask).sum()
        assert iou > 0.9, iou

    other = json.loads((out / f"cat_{image_id_for(B_URI)}.json").read_text())
    assert other["imagePath"] == B_URI and len(other["shapes"]) == 1
    assert json.loads((out / "empty.json").read_text())["shapes"] == []
    assert _leftovers(out) == []

    # min_score drops shapes, not files
    out2 = tmp_path / "lm2"
    assert writers.write_labelme(_rows_iter(parts), str(out2), min_score=0.85) == 4
    assert [s["label"] for s in json.loads((out2 / "cat.json").read_text())["shapes"]] == ["person"]


def test_failure_mid_write_publishes_nothing(parts, tmp_path):
    out_dir = tmp_path / "pub"
    out_dir.mkdir()

    def rows_then_crash():
        yield from writers.iter_rows(parts[:1])
        raise RuntimeError("worker died")

    for name, write in (("r.json", lambda it, p: writers.write_coco_results(it, p, LABELS)),
                        ("d.json", lambda it, p: writers.write_coco_dataset(it, p, LABELS))):
        with pytest.raises(RuntimeError, match="worker died"):
            write(rows_then_crash(), str(out_dir / name))
        assert not (out_dir / name).exists()
        # an earlier export under the final name survives a failed re-export untouched
        (out_dir / name).write_text("previous")
        with pytest.raises(RuntimeError):
            write(rows_then_crash(), str(out_dir / name))
        assert (out_dir / name).read_text() == "previous"
    assert sorted(p.name for p in out_dir.iterdir()) == ["d.json", "r.json"]  # no temp files


def test_rows_of_another_model_are_rejected(parts, tmp_path):
    out = tmp_path / "x.json"
    with pytest.raises(ValueError, match="outside categories"):
        writers.write_coco_results(_rows_iter(parts), str(out), ["person"])
    with pytest.raises(ValueError, match="labelled 'car'"):
        writers.write_coco_dataset(_rows_iter(parts), str(out), ["person", "bicycle"])
    assert list(tmp_path.glob("*.json")) == [] and _leftovers(tmp_path) == []


def test_s3_round_trip(s3_bucket, tmp_path, monkeypatch):
    staging = tmp_path / "staging"  # where remote outputs are staged before upload
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    base = f"s3://{s3_bucket}/out"
    parts = _write_parts(base)
    fs = fsspec.filesystem("s3")
    assert sorted(fs.unstrip_protocol(p) for p in fs.find(f"{base}/parts")) == parts

    assert writers.write_coco_results(_rows_iter(parts), f"{base}/coco_results.json", LABELS) == 6
    assert writers.write_coco_dataset(_rows_iter(parts), f"{base}/coco_dataset.json", LABELS) == \
        {"images": 4, "annotations": 5}
    assert writers.write_labelme(_rows_iter(parts), f"{base}/labelme") == 4

    local = tmp_path / "dl"
    local.mkdir()
    for name in ("coco_results.json", "coco_dataset.json"):
        with fsspec.open(f"{base}/{name}", "rb") as f:
            (local / name).write_bytes(f.read())
    gt = COCO(str(local / "coco_dataset.json"))
    assert len(gt.getImgIds()) == 4 and len(gt.getAnnIds()) == 5
    assert len(json.loads((local / "coco_results.json").read_text())) == 6

    assert fs.info(f"{base}/coco_results.json")["ContentType"] == "application/json"

    def rows_then_crash():
        yield from writers.iter_rows(parts[:1])
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        writers.write_coco_dataset(rows_then_crash(), f"{base}/failed.json", LABELS)
    assert list(staging.iterdir()) == []  # staged temp files removed, after success and failure

    fs.invalidate_cache()
    assert not fs.exists(f"{base}/failed.json")
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{base}/labelme", detail=False))
    assert listed == sorted(["cat.json", f"cat_{image_id_for(B_URI)}.json", "empty.json", "retried.json"])
    with fsspec.open(f"{base}/labelme/cat.json", "r") as f:
        doc = json.load(f)
    assert doc["imagePath"] == A_URI and len(doc["shapes"]) == 4
    # nothing but the outputs and the parts was left in the bucket
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)) == \
        ["coco_dataset.json", "coco_results.json", "labelme", "parts"]


def test_coco_file_names_are_unique_and_relative_to_the_input(tmp_path):
    """Two images with one basename in different folders keep apart: ``file_name`` is the path
    under the job's input root (it used to be the basename, so both were ``img.jpg``)."""
    same = dict(masks=[_rect(5, 5, 30, 30)], class_ids=[0], scores=[0.9])
    uris = ["/data/in/a/img.jpg", "/data/in/b/img.jpg", "/elsewhere/img.jpg", "http://u:pw@host/x/img.jpg?sig=1"]
    rows = [ok_row(u, _instances(**same), LABELS, RUN, MODEL) for u in uris]
    out = tmp_path / "coco_dataset.json"
    writers.write_coco_dataset(iter(rows), str(out), LABELS, image_root="/data/in/")
    names = [im["file_name"] for im in json.loads(out.read_text())["images"]]
    assert names == ["a/img.jpg", "b/img.jpg", "elsewhere/img.jpg", "host/x/img.jpg"]  # no credentials
    assert writers.coco_file_name("s3://bucket/in/a/img.jpg", "s3://bucket/in") == "a/img.jpg"
    assert writers.coco_file_name("s3://bucket/input2/img.jpg", "s3://bucket/in") == "bucket/input2/img.jpg"


def test_input_root_of_each_kind_of_input(tmp_path):
    from pipelines.shards import input_root

    (tmp_path / "one.jpg").write_bytes(b"")
    assert input_root(str(tmp_path)) == input_root(str(tmp_path) + "/") == str(tmp_path)
    assert input_root(str(tmp_path / "one.jpg")) == str(tmp_path)
    assert input_root("s3://b/imgs/") == "s3://b/imgs"
    assert input_root("s3://b/imgs/2024-*/*.jpg") == "s3://b/imgs"
    assert input_root("s3://b/list.csv") is None and input_root(str(tmp_path / "m.parquet")) is None
