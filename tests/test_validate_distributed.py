"""Distributed dataset validation on a local Ray cluster, dataset local and on loopback S3."""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("ray")

from conftest import SHARED  # noqa: E402
from pipelines.validate import find_remote_root, validate_dataset  # noqa: E402

COCO = SHARED / "data" / "coco_tiny_val2017"



def _dataset(tmp_path: Path) -> Path:
    if not COCO.is_dir():
        pytest.skip("shared COCO data not present")
    root = tmp_path / "ds" / "coco_tiny"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    full = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    mini = json.loads((COCO / "annotations" / "instances_val2017_mini8.json").read_text())
    for img in full["images"]:
        shutil.copy(COCO / "val2017" / img["file_name"], root / "images" / img["file_name"])
    (root / "annotations" / "instance_train.json").write_text(json.dumps(full))
    (root / "annotations" / "instance_val.json").write_text(json.dumps(mini))
    return root


def _break(root: Path) -> None:
    """One missing file, one truncated file, one wrong declared size."""
    train = json.loads((root / "annotations" / "instance_train.json").read_text())
    imgs = train["images"]
    (root / "images" / imgs[0]["file_name"]).unlink()
    p = root / "images" / imgs[1]["file_name"]
    p.write_bytes(p.read_bytes()[:3000])
    imgs[2]["width"] += 7
    (root / "annotations" / "instance_train.json").write_text(json.dumps(train))


def test_local_dataset_matches_single_machine_check(ray_local, tmp_path):
    from instseg_core.datasets.check import check_dataset

    root = _dataset(tmp_path)
    _break(root)
    dist = validate_dataset(str(root.parent), str(tmp_path / "out_ray"))
    local = check_dataset(root.parent, tmp_path / "out_local")
    assert dist["check_pass"] is False
    kinds = {k: v["count"] for k, v in dist["deep_check"]["by_kind"].items()}
    assert kinds == {"image_missing": 1, "image_undecodable": 1, "size_mismatch": 1}
    assert kinds == {k: v["count"] for k, v in local["deep_check"]["by_kind"].items()}
    assert dist["attributes"] == {**local["attributes"], "train_sample_paths": dist["attributes"]["train_sample_paths"]}
    saved = json.loads((tmp_path / "out_ray" / "check_dataset_result.json").read_text())
    assert saved["deep_check"]["error_count"] == 3 and (tmp_path / "out_ray" / "check_dataset" / "histogram.png").is_file()


def test_s3_dataset(ray_local, tmp_path, s3_bucket, s3_server):
    import boto3

    root = _dataset(tmp_path)
    _break(root)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for f in root.rglob("*"):
        if f.is_file():
            s3.put_object(Bucket=s3_bucket, Key=f"datasets/{f.relative_to(root.parent)}", Body=f.read_bytes())
    uri = f"s3://{s3_bucket}/datasets"
    assert find_remote_root(uri) == f"s3://{s3_bucket}/datasets/coco_tiny"
    result = validate_dataset(uri, str(tmp_path / "out"))
    assert result["dataset_path"] == "coco_tiny" and result["check_pass"] is False
    by_kind = result["deep_check"]["by_kind"]
    assert {k: v["count"] for k, v in by_kind.items()} == {"image_missing": 1, "image_undecodable": 1,
                                                           "size_mismatch": 1}
    assert "s3://" in by_kind["image_undecodable"]["examples"][0]["message"]
    assert result["attributes"]["train_samples"] == 815 and len(result["attributes"]["val_sample_paths"]) == 8
