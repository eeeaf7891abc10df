"""Dataset checking (instseg_core.datasets) on real COCO data and on deliberately broken copies.

Datasets are built in tmp_path (image symlinks into ../shared, JSON written fresh); the shared
files are hashed before and after to prove nothing there is modified or deleted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from instseg_core.datasets import (
    KIND_LEVELS,
    DatasetError,
    Problem,
    check_annotations,
    check_dataset,
    check_image,
    find_dataset_root,
    load_coco,
    summarize_problems,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "coco_tiny_val2017"
FULL_JSON = DATA / "annotations" / "instances_val2017.json"
MINI_JSON = DATA / "annotations" / "instances_val2017_mini8.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (following symlinks), keyed by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data() -> Path:
    """The shared COCO subset; skips when absent. Fails at teardown if any of its files changed."""
    if not (FULL_JSON.is_file() and MINI_JSON.is_file()):
        pytest.skip(f"shared COCO data not found at {DATA}")
    before = _tree_hashes(DATA)
    yield DATA
    assert _tree_hashes(DATA) == before, "shared dataset files were modified or deleted"


@pytest.fixture(scope="module")
def full_json(data: Path) -> dict:
    return json.loads(FULL_JSON.read_text())


@pytest.fixture(scope="module")
def mini_json(data: Path) -> dict:
    return json.loads(MINI_JSON.read_text())


def build_dataset(base: Path, train: dict, val: dict, *, name: str = "coco1") -> Path:
    """A PaddleX-layout dataset ``base/<name>`` with symlinked images of both splits; returns ``base``."""
    root = base / name
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for img in train["images"] + val["images"]:
        dst = root / "images" / img["file_name"]
        if not dst.exists():
            try:
                dst.symlink_to(DATA / "val2017" / img["file_name"])
            except OSError:  # no symlinks on this filesystem
                shutil.copyfile(DATA / "val2017" / img["file_name"], dst)
    (root / "annotations" / "instance_train.json").write_text(json.dumps(train))
    (root / "annotations" / "instance_val.json").write_text(json.dumps(val))
    return base


def run_check(dataset_dir: Path, out: Path, **kw: Any) -> dict:
    """check_dataset, asserting it leaves the dataset tree (and the files it links to) untouched."""
    before = _tree_hashes(dataset_dir)
    result = check_dataset(dataset_dir, out, **kw)
    assert _tree_hashes(dataset_dir) == before
    assert json.loads((out / "check_dataset_result.json").read_text()) == result
    return result


# ---------------------------------------------------------------------------------------------
# a good dataset


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, full_json: dict, mini_json: dict) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("good")
    ds = build_dataset(base / "ds", full_json, mini_json)
    out = base / "out"
    return out, run_check(ds, out)


def test_result_schema_and_values(good_run: tuple[Path, dict], mini_json: dict) -> None:
    out, result = good_run
    assert result["done_flag"] is True and result["check_pass"] is True
    attrs = result["attributes"]
    assert attrs["num_classes"] == len({c["id"] for c in mini_json["categories"]}) == 80
    assert attrs["train_samples"] == 815 and attrs["val_samples"] == 74  # annotations, not images
    # up to sample_num=10 images from each split (PaddleX's shared counter would give val 0 here)
    assert len(attrs["train_sample_paths"]) == 10 and len(attrs["val_sample_paths"]) == 8
    for rel in attrs["train_sample_paths"] + attrs["val_sample_paths"]:
        assert rel.startswith("check_dataset/demo_img/") and (out / rel).is_file()
    assert result["analysis"] == {"histogram": "check_dataset/histogram.png"}
    assert (out / "check_dataset" / "histogram.png").read_bytes()[:8] == PNG_MAGIC
    assert result["dataset_path"] == "coco1"
    assert result["show_type"] == "image" and result["dataset_type"] == "COCOInstSegDataset"
    assert result["deep_check"] == {"error_count": 0, "warning_count": 0, "by_kind": {}}
    text = (out / "check_dataset_result.json").read_text()
    assert "\\/" not in text and text.startswith('{\n  "done_flag": true')  # plain json, indent 2


def test_demo_images_are_drawn(good_run: tuple[Path, dict]) -> None:
    import numpy as np
    from PIL import Image

    out, result = good_run
    for rel in result["attributes"]["val_sample_paths"][:2]:
        drawn = np.asarray(Image.open(out / rel).convert("RGB"), dtype=np.int16)
        src = np.asarray(Image.open(DATA / "val2017" / Path(rel).name).convert("RGB"), dtype=np.int16)
        assert drawn.shape == src.shape
        assert (np.abs(drawn - src).max(axis=2) > 40).mean() > 0.01  # masks/boxes changed the image


def test_sample_num_per_split(tmp_path: Path, mini_json: dict) -> None:
    ds = build_dataset(tmp_path / "ds", mini_json, mini_json)
    result = run_check(ds, tmp_path / "out", sample_num=3, check_images=False)
    assert len(result["attributes"]["train_sample_paths"]) == 3
    assert len(result["attributes"]["val_sample_paths"]) == 3


def test_crowd_rle_is_valid(full_json: dict) -> None:
    from pycocotools import mask as coco_mask

    crowd = [a for a in full_json["annotations"] if a["iscrowd"] == 1]
    assert len(crowd) == 11 and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert check_annotations(full_json, full_json) == []
    # the same masks as compressed (string) RLE are valid too
    compressed = copy.deepcopy(full_json)
    for ann in compressed["annotations"]:
        seg = ann["segmentation"]
        if isinstance(seg, dict):
            rle = coco_mask.frPyObjects(seg, *seg["size"])
            ann["segmentation"] = {"size": seg["size"], "counts": rle["counts"].decode("ascii")}
    assert check_annotations(compressed, compressed) == []


# ---------------------------------------------------------------------------------------------
# fatal layout / file errors (no shared data needed)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


EMPTY_COCO = json.dumps({"images": [], "annotations": [], "categories": []})


def _failed_result(out: Path) -> dict:
    result = json.loads((out / "check_dataset_result.json").read_text())
    assert result["done_flag"] is False and "DatasetError" in result["err_type"]
    return result


def test_no_images_dir(tmp_path: Path) -> None:
    _write(tmp_path / "ds" / "coco" / "annotations" / "instance_train.json", EMPTY_COCO)
    with pytest.raises(DatasetError, match="no 'images' directory"):
        check_dataset(tmp_path / "ds", tmp_path / "out")
    _failed_result(tmp_path / "out")


def test_two_images_dirs(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / "ds" / sub / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="found 2 'images' directories") as info:
        find_dataset_root(tmp_path / "ds")
    assert str(tmp_path / "ds" / "a" / "images") in str(info.value)
    assert str(tmp_path / "ds" / "b" / "images") in str(info.value)


def test_root_detection(tmp_path: Path) -> None:
    (tmp_path / "ds" / "nested" / "coco1" / "images").mkdir(parents=True)
    assert find_dataset_root(tmp_path / "ds") == tmp_path / "ds" / "nested" / "coco1"
    with pytest.raises(DatasetError, match="does not exist"):
        find_dataset_root(tmp_path / "nope")


def test_missing_val_json(tmp_path: Path) -> None:
    (tmp_path / "ds" / "images").mkdir(parents=True)
    _write(tmp_path / "ds" / "annotations" / "instance_train.json", EMPTY_COCO)
    with pytest.raises(DatasetError, match="instance_val.json") as info:
        check_dataset(tmp_path, tmp_path / "out")
    assert "ensure that both instance_train.json and instance_val.json exist" in str(info.value)
    assert "instance_val.json" in _failed_result(tmp_path / "out")["err_msg"]


def test_corrupt_json(tmp_path: Path) -> None:
    (tmp_path / "ds" / "images").mkdir(parents=True)
    _write(tmp_path / "ds" / "annotations" / "instance_train.json", EMPTY_COCO)
    bad = tmp_path / "ds" / "annotations" / "instance_val.json"
    _write(bad, '{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DatasetError) as info:
        check_dataset(tmp_path, tmp_path / "out")
    assert str(bad) in str(info.value) and "line 3, column" in str(info.value)
    _write(bad, "[]")
    with pytest.raises(DatasetError, match="must hold a JSON object"):
        load_coco(bad)


# ---------------------------------------------------------------------------------------------
# deeper checks: one broken dataset per kind

Mutator = Callable[[dict, dict, Path], None]  # (train, val, dataset root) -> None, in place


def _polygon_ann(coco: dict, image_id: int | None = None) -> dict:
    return next(a for a in coco["annotations"] if a["iscrowd"] == 0 and image_id in (None, a["image_id"]))


def _crowd_ann(coco: dict) -> dict:
    return next(a for a in coco["annotations"] if a["iscrowd"] == 1)


def _image_without_rle(coco: dict) -> dict:
    crowd_images = {a["image_id"] for a in coco["annotations"] if isinstance(a["segmentation"], dict)}
    return next(i for i in coco["images"] if i["id"] not in crowd_images)


def _replace_image(root: Path, file_name: str, data: bytes) -> None:
    path = root / "images" / file_name
    path.unlink()  # drop the symlink first: writing through it would change the shared file
    path.write_bytes(data)


def _mut_missing_fields(t: dict, v: dict, root: Path) -> None:
    del _polygon_ann(t)["area"]


def _mut_duplicate_image_id(t: dict, v: dict, root: Path) -> None:
    t["images"].append(dict(t["images"][0]))


def _mut_duplicate_ann_id(t: dict, v: dict, root: Path) -> None:
    t["annotations"][1]["id"] = t["annotations"][0]["id"]


def _mut_duplicate_category_id(t: dict, v: dict, root: Path) -> None:
    for coco in (t, v):  # both, so that the category sets still match
        coco["categories"].append(dict(coco["categories"][0]))


def _mut_unknown_category(t: dict, v: dict, root: Path) -> None:
    _polygon_ann(t)["category_id"] = 9999


def _mut_ann_missing_image(t: dict, v: dict, root: Path) -> None:
    _polygon_ann(t)["image_id"] = 999999999


def _mut_categories_differ(t: dict, v: dict, root: Path) -> None:
    v["categories"].append({"id": 999, "name": "extra", "supercategory": "x"})
    v["categories"][0]["name"] = "renamed"


def _mut_image_missing(t: dict, v: dict, root: Path) -> None:
    (root / "images" / t["images"][0]["file_name"]).unlink()


def _mut_image_undecodable(t: dict, v: dict, root: Path) -> None:
    name = t["images"][0]["file_name"]
    data = (DATA / "val2017" / name).read_bytes()
    _replace_image(root, name, data[: len(data) // 2])  # truncated JPEG: header fine, body cut


def _mut_size_mismatch(t: dict, v: dict, root: Path) -> None:
    _image_without_rle(t)["width"] += 16  # wider, so the boxes stay inside


def _mut_polygon_too_few_points(t: dict, v: dict, root: Path) -> None:
    _polygon_ann(t)["segmentation"] = [[10, 10, 20, 20]]


def _mut_zero_area_polygon(t: dict, v: dict, root: Path) -> None:
    _polygon_ann(t)["segmentation"] = [[10, 10, 20, 10, 30, 10]]  # collinear: no pixel


def _mut_zero_area_rle(t: dict, v: dict, root: Path) -> None:
    seg = _crowd_ann(t)["segmentation"]
    seg["counts"] = [seg["size"][0] * seg["size"][1]]


def _mut_invalid_rle_size(t: dict, v: dict, root: Path) -> None:
    ann = _crowd_ann(t)
    h, w = ann["segmentation"]["size"]
    ann["segmentation"] = {"size": [h, w - 1], "counts": [h * (w - 1) - 5, 5]}  # self-consistent, wrong size


def _mut_invalid_rle_counts(t: dict, v: dict, root: Path) -> None:
    _crowd_ann(t)["segmentation"]["counts"][0] += 7  # no longer sums to h*w


def _mut_invalid_rle_string(t: dict, v: dict, root: Path) -> None:
    _crowd_ann(t)["segmentation"]["counts"] = "not RLE!"


def _mut_bbox_outside(t: dict, v: dict, root: Path) -> None:
    ann = _polygon_ann(t)
    width = next(i["width"] for i in t["images"] if i["id"] == ann["image_id"])
    ann["bbox"][0] = width + 50


def _mut_bbox_empty(t: dict, v: dict, root: Path) -> None:
    _polygon_ann(t)["bbox"][2] = 0


CASES: list[tuple[str, Mutator]] = [
    ("missing_fields", _mut_missing_fields),
    ("duplicate_image_id", _mut_duplicate_image_id),
    ("duplicate_ann_id", _mut_duplicate_ann_id),
    ("duplicate_category_id", _mut_duplicate_category_id),
    ("unknown_category", _mut_unknown_category),
    ("ann_missing_image", _mut_ann_missing_image),
    ("categories_differ", _mut_categories_differ),
    ("image_missing", _mut_image_missing),
    ("image_undecodable", _mut_image_undecodable),
    ("size_mismatch", _mut_size_mismatch),
    ("polygon_too_few_points", _mut_polygon_too_few_points),
    ("zero_area_mask", _mut_zero_area_polygon),
    ("zero_area_mask", _mut_zero_area_rle),
    ("invalid_rle", _mut_invalid_rle_size),
    ("invalid_rle", _mut_invalid_rle_counts),
    ("invalid_rle", _mut_invalid_rle_string),
    ("bbox_outside", _mut_bbox_outside),
    ("bbox_outside", _mut_bbox_empty),
]


def test_cases_cover_every_kind() -> None:
    assert {kind for kind, _ in CASES} == set(KIND_LEVELS)


@pytest.fixture(scope="module")
def mini_used(mini_json: dict) -> dict:
    """mini8 with only the 29 categories it uses: a 29-bar histogram keeps each case fast."""
    used = {a["category_id"] for a in mini_json["annotations"]}
    return {**mini_json, "categories": [c for c in mini_json["categories"] if c["id"] in used]}


@pytest.mark.parametrize(("kind", "mutate"), CASES, ids=[m.__name__[5:] for _, m in CASES])
def test_deep_check_kind(kind: str, mutate: Mutator, tmp_path: Path, mini_used: dict) -> None:
    train, val = copy.deepcopy(mini_used), copy.deepcopy(mini_used)
    ds = build_dataset(tmp_path / "ds", train, val)
    root = ds / "coco1"
    mutate(train, val, root)
    (root / "annotations" / "instance_train.json").write_text(json.dumps(train))
    (root / "annotations" / "instance_val.json").write_text(json.dumps(val))
    result = run_check(ds, tmp_path / "out", sample_num=1)
    deep = result["deep_check"]
    assert list(deep["by_kind"]) == [kind], json.dumps(deep, indent=1)[:2000]
    entry = deep["by_kind"][kind]
    assert entry["level"] == KIND_LEVELS[kind] and entry["count"] >= 1 and entry["examples"]
    assert result["check_pass"] is (KIND_LEVELS[kind] == "warning")
    assert result["done_flag"] is True


def test_categories_differ_details(mini_json: dict) -> None:
    train, val = copy.deepcopy(mini_json), copy.deepcopy(mini_json)
    used = {a["category_id"] for a in val["annotations"]}
    dropped = next(c for c in val["categories"] if c["id"] not in used)
    val["categories"].remove(dropped)
    _mut_categories_differ(train, val, Path("."))
    (problem,) = check_annotations(train, val)
    assert problem.kind == "categories_differ" and problem.split == "train+val"
    assert problem.ids == {"train_only": [dropped["id"]], "val_only": [999], "renamed": [val["categories"][0]["id"]]}
    assert "'renamed'" in problem.message


def test_missing_top_level_and_malformed_fields() -> None:
    train = {"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0,
                              "area": 1.0, "segmentation": [[0, 0, 5, 0, 5]]}],  # odd length
             "categories": [{"id": 1, "name": "x"}]}
    val = {"images": [], "categories": [{"id": 1, "name": "x"}]}  # no "annotations"
    problems = check_annotations(train, val)
    assert [(p.kind, p.split) for p in problems] == [("missing_fields", "train"), ("missing_fields", "val")]
    assert "odd number" in problems[0].message and "'annotations'" in problems[1].message


# ---------------------------------------------------------------------------------------------
# check_image and summarize_problems


def test_check_image(tmp_path: Path, data: Path) -> None:
    path = data / "val2017" / "000000005001.jpg"
    blob = path.read_bytes()
    from PIL import Image

    w, h = Image.open(path).size
    assert check_image(path, (w, h)) == []
    assert check_image(blob, (w, h)) == [] and check_image(blob, None) == []
    (p,) = check_image(blob, (w + 1, h), split="val", ids={"image_id": 5001})
    assert (p.kind, p.level, p.split, p.ids) == ("size_mismatch", "error", "val", {"image_id": 5001})
    assert [p.kind for p in check_image(blob[: len(blob) // 2], (w, h))] == ["image_undecodable"]
    assert [p.kind for p in check_image(b"not an image", None)] == ["image_undecodable"]
    assert [p.kind for p in check_image(tmp_path / "missing.jpg", (w, h))] == ["image_missing"]
    assert [p.kind for p in check_image(tmp_path, None)] == ["image_undecodable"]  # a directory


def test_summarize_problems() -> None:
    problems = [Problem.of("bbox_outside", "train", f"box {i}", ann_id=i) for i in range(5)]
    problems.append(Problem.of("image_missing", "val", "gone", image_id=3))
    summary = summarize_problems(problems, max_examples=2)
    assert summary["error_count"] == 1 and summary["warning_count"] == 5
    assert list(summary["by_kind"]) == ["image_missing", "bbox_outside"]  # errors first
    bbox = summary["by_kind"]["bbox_outside"]
    assert bbox["level"] == "warning" and bbox["count"] == 5
    assert bbox["examples"] == [{"split": "train", "message": "box 0", "ids": {"ann_id": 0}},
                                {"split": "train", "message": "box 1", "ids": {"ann_id": 1}}]
    json.dumps(summary)  # JSON-ready


def test_cli_check_dataset_on_a_broken_dataset_fails_with_a_summary(tmp_path: Path, mini_used: dict, caplog) -> None:
    """`instseg run ... check_dataset` used to exit 0 and say nothing useful: now it logs the
    verdict and each problem kind with examples, and exits 1."""
    import logging

    from instseg_core.cli import main

    train, val = copy.deepcopy(mini_used), copy.deepcopy(mini_used)
    ds = build_dataset(tmp_path / "ds", train, val)
    root = ds / "coco1"
    missing = val["images"][0]["file_name"]
    (root / "images" / missing).unlink()
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="instseg"):
        rc = main(["run", "-c", "shapes_tiny", "-o", "Global.mode=check_dataset", "-o", f"Global.dataset_dir={ds}",
                   "-o", f"Global.output={out}"])
    assert rc == 1
    assert "dataset check FAILED: " in caplog.text and "image_missing x" in caplog.text and missing in caplog.text
    result = json.loads((out / "check_dataset_result.json").read_text())
    assert result["done_flag"] is True and result["check_pass"] is False  # the report is kept, not replaced
