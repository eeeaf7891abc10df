"""The standard COCO layout (``val2017/`` + ``annotations/instances_val2017.json``) in check_dataset:
recognised with the exact options to convert it, and converted to PaddleX's layout (issue 16, item 12).

Synthetic datasets are built in tmp_path; the real COCO subset from ../shared is copied there (never
linked: the conversion hard-links photos, and the shared files must stay untouched).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from instseg_core.datasets import DatasetError, check_dataset
from instseg_core.datasets.coco_convert import convert_standard_coco
from instseg_core.datasets.convert import conversion_log_lines, convert_dataset, source_type
from instseg_core.datasets.labelme import ConvertError
from instseg_core.datasets.layout import find_standard_coco, layout_hint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_TINY = SHARED / "coco_tiny_val2017"
LABELME_EXAMPLE = SHARED / "labelme_instance_segmentation" / "examples" / "instance_segmentation" / "data_annotated"
CONVERT_COCO = "-o CheckDataset.convert.enable=True -o CheckDataset.convert.src_dataset_type=COCO"


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def standard_coco(root: Path, splits: dict[str, int], *, under_images: bool = False) -> Path:
    """A small standard-COCO dataset: ``<name>/`` photos and ``annotations/instances_<name>.json`` per split,
    with COCO-style non-contiguous category ids, a crowd RLE and ``info``/``licenses``."""
    categories = [{"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 18, "name": "dog",
                                                                          "supercategory": "animal"}]
    image_id, ann_id = 100, 900
    for name, count in splits.items():
        folder = root / ("images" if under_images else "") / name
        folder.mkdir(parents=True)
        images, anns = [], []
        for _ in range(count):
            image_id += 1
            file_name = f"{image_id:012d}.png"
            Image.new("RGB", (48, 32), (image_id % 255, 40, 90)).save(folder / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": 48, "height": 32, "license": 1})
            ann_id += 1
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 3, "iscrowd": 0, "area": 100.0,
                         "bbox": [4.0, 4.0, 10.0, 10.0], "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]})
            ann_id += 1
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 18, "iscrowd": 1, "area": 32.0,
                         "bbox": [0.0, 0.0, 1.0, 32.0], "segmentation": {"size": [32, 48], "counts": [0, 32, 1504]}})
        (root / "annotations").mkdir(exist_ok=True)
        coco = {"info": {"description": "synthetic"}, "licenses": [{"id": 1, "name": "CC0"}], "images": images,
                "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(coco))
    return root


def load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instance_{split}.json").read_text())


def test_check_dataset_names_the_conversion_for_a_standard_layout(tmp_path: Path) -> None:
    """Used to say only "no 'images' directory": now it names the layout and the options to convert it."""
    root = standard_coco(tmp_path / "coco", {"val2017": 2})
    with pytest.raises(DatasetError) as err:
        check_dataset(root, tmp_path / "out")
    msg = str(err.value)
    assert "standard COCO layout (annotations/instances_val2017.json + val2017/)" in msg and CONVERT_COCO in msg
    assert "\n" not in msg


def test_check_dataset_names_the_conversion_for_images_subfolders(tmp_path: Path) -> None:
    """``images/val2017/`` is found as the images folder, then the missing instance_*.json gets the hint."""
    root = standard_coco(tmp_path / "coco", {"val2017": 2}, under_images=True)
    with pytest.raises(DatasetError, match="instance_train.json") as err:
        check_dataset(root, tmp_path / "out")
    assert "annotations/instances_val2017.json + images/val2017/" in str(err.value) and CONVERT_COCO in str(err.value)


def test_check_dataset_names_the_conversion_for_labelme_files(tmp_path: Path) -> None:
    if not LABELME_EXAMPLE.is_dir():
        pytest.skip(f"LabelMe examples not found at {LABELME_EXAMPLE}")
    shutil.copytree(LABELME_EXAMPLE, tmp_path / "lm" / "data_annotated")
    with pytest.raises(DatasetError, match="src_dataset_type=LabelMe"):
        check_dataset(tmp_path / "lm", tmp_path / "out")
    assert layout_hint(tmp_path / "nothing") == ""


def test_two_splits_kept_as_they_are(tmp_path: Path) -> None:
    root = standard_coco(tmp_path / "coco", {"train2017": 3, "val2017": 2})
    before = hashes(root)
    stats = convert_standard_coco(root)
    assert stats["split_from"] is None and stats["errors"] == [] and stats["images_linked"] == 5
    assert (stats["train"], stats["val"]) == ({"images": 3, "annotations": 6}, {"images": 2, "annotations": 4})
    for split, name in (("train", "train2017"), ("val", "val2017")):
        src = json.loads((root / "annotations" / f"instances_{name}.json").read_text())
        out = load(root, split)
        assert list(out)[:3] == ["categories", "images", "annotations"]
        assert out["annotations"] == src["annotations"] and out["categories"] == src["categories"]  # verbatim
        assert out["info"] == src["info"] and out["licenses"] == src["licenses"]
        assert [i["file_name"] for i in out["images"]] == [f"{name}/{i['file_name']}" for i in src["images"]]
        for img in out["images"]:  # hard links of the originals
            assert (root / "images" / img["file_name"]).samefile(root / img["file_name"])
    after = hashes(root)
    assert all(after[k] == v for k, v in before.items())  # the input is untouched
    result = check_dataset(root, tmp_path / "out")
    assert result["check_pass"], result["deep_check"]
    assert result["attributes"]["num_classes"] == 2


def test_photos_already_under_images(tmp_path: Path) -> None:
    root = standard_coco(tmp_path / "coco", {"val2017": 5}, under_images=True)
    stats = convert_standard_coco(root, seed=1)
    assert stats["images_linked"] + stats["images_copied"] == 0 and stats["split_from"] == "val"
    assert (stats["train"]["images"], stats["val"]["images"]) == (4, 1)
    assert all(i["file_name"].startswith("val2017/") for i in load(root, "train")["images"])
    assert check_dataset(root, tmp_path / "out")["check_pass"]


def test_single_split_is_cut_with_the_seed(tmp_path: Path) -> None:
    runs = []
    for i, seed in enumerate((5, 5, 6)):
        root = standard_coco(tmp_path / f"c{i}", {"val2017": 10})
        convert_standard_coco(root, seed=seed)
        runs.append([sorted(i["id"] for i in load(root, s)["images"]) for s in ("train", "val")])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    train, val = runs[0]
    assert (len(train), len(val)) == (8, 2) and not set(train) & set(val)
    out = load(tmp_path / "c0", "val")
    assert {a["image_id"] for a in out["annotations"]} == set(val)  # annotations follow their image


def test_rerun_reuses_photos_and_backs_up_outputs(tmp_path: Path) -> None:
    root = standard_coco(tmp_path / "coco", {"train2017": 2, "val2017": 1})
    convert_standard_coco(root)
    first = load(root, "train")
    stats = convert_standard_coco(root)
    assert stats["images_linked"] + stats["images_copied"] == 0
    assert sorted(Path(b).name for b in stats["backups"]) == ["instance_train.json.bak", "instance_val.json.bak"]
    assert load(root, "train") == first


def test_errors_stop_before_writing(tmp_path: Path) -> None:
    # no layout at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match=r"no standard COCO layout in .*empty: expected annotations/instances_"):
        convert_standard_coco(tmp_path / "empty")
    # an annotation file without its photo folder: named in the error
    root = standard_coco(tmp_path / "nofolder", {"val2017": 1})
    shutil.rmtree(root / "val2017")
    with pytest.raises(ConvertError, match=r"instances_val2017.json: no image folder val2017/"):
        convert_standard_coco(root)
    # two candidates for one split
    root = standard_coco(tmp_path / "two", {"train2014": 1, "train2017": 1})
    with pytest.raises(ConvertError, match="two train splits .*instances_train2014.json and instances_train2017.json"):
        convert_standard_coco(root)
    # every photo missing
    root = standard_coco(tmp_path / "gone", {"val2017": 3})
    for p in (root / "val2017").iterdir():
        p.unlink()
    before = hashes(root)
    with pytest.raises(ConvertError, match=r"none of the 3 photos of instances_val2017.json is in .*val2017"):
        convert_standard_coco(root)
    assert hashes(root) == before and not (root / "images").exists()
    # a different file where a photo would go
    root = standard_coco(tmp_path / "taken", {"val2017": 2})
    taken = root / "images" / "val2017" / "000000000101.png"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"not the same photo")
    before = hashes(root)
    with pytest.raises(ConvertError, match="000000000101.png already exists and is not a copy of"):
        convert_standard_coco(root)
    assert hashes(root) == before
    # an unusable annotation file
    root = standard_coco(tmp_path / "bad", {"val2017": 1})
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [{"id": 1}], "annotations": []}')
    with pytest.raises(ConvertError, match=r"instances_val2017.json: image #0 has no usable 'file_name'"):
        convert_standard_coco(root)
    # a file_name outside the photo folder is not linked into images/
    root = standard_coco(tmp_path / "escape", {"val2017": 1})
    (root / "secret.png").write_bytes(b"x")
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "../secret.png"}], "annotations": []}))
    with pytest.raises(ConvertError, match=r"image #0 file_name '../secret.png' leaves .*val2017"):
        convert_standard_coco(root)
    assert not (root / "images").exists()


def test_some_photos_missing_are_reported_by_the_check(tmp_path: Path) -> None:
    root = standard_coco(tmp_path / "coco", {"train2017": 2, "val2017": 2})
    (root / "val2017" / "000000000104.png").unlink()
    stats = convert_standard_coco(root)
    assert stats["missing_images"] == 1 and "000000000104.png" in stats["errors"][0]
    result = check_dataset(root, tmp_path / "out")
    assert not result["check_pass"] and "image_missing" in result["deep_check"]["by_kind"]


def test_source_type_any_case() -> None:
    assert [source_type(v) for v in ("coco", " COCO ", "Coco", "labelme", "LabelMe", "LABELME")] == \
        ["COCO"] * 3 + ["LabelMe"] * 3
    for bad in (None, "", "VOC", 3):
        with pytest.raises(ConvertError, match="must be LabelMe or COCO"):
            source_type(bad)


# ---------------------------------------------------------------------------------------------
# the real COCO subset


@pytest.fixture()
def coco_tiny(tmp_path: Path) -> Path:
    """A copy of ../shared/data/coco_tiny_val2017 (its 80 photos and both annotation files)."""
    if not (COCO_TINY / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"shared COCO data not found at {COCO_TINY}")
    root = tmp_path / "coco_tiny_val2017"
    shutil.copytree(COCO_TINY / "val2017", root / "val2017")
    shutil.copytree(COCO_TINY / "annotations", root / "annotations")
    return root


def test_coco_tiny_val2017_found_and_converted(coco_tiny: Path, tmp_path: Path) -> None:
    sources, notes = find_standard_coco(coco_tiny)
    assert [(s.split, s.name) for s in sources] == [("val", "val2017")]
    assert notes == [f"instances_val2017_mini8.json: no image folder val2017_mini8/ (or images/val2017_mini8/) in "
                     f"{coco_tiny}; not used"]
    before = hashes(coco_tiny)
    stats = convert_dataset(coco_tiny, "coco")
    assert stats["src_dataset_type"] == "COCO" and stats["split_from"] == "val"
    assert (stats["train"]["images"], stats["val"]["images"]) == (64, 16)
    assert stats["train"]["annotations"] + stats["val"]["annotations"] == 815
    assert stats["images_linked"] + stats["images_copied"] == 80 and stats["errors"] == []
    after = hashes(coco_tiny)
    assert all(after[k] == v for k, v in before.items())

    src = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    train, val = load(coco_tiny, "train"), load(coco_tiny, "val")
    assert train["categories"] == val["categories"] == src["categories"]
    by_id = {a["id"]: a for a in src["annotations"]}
    assert all(by_id[a["id"]] == a for a in train["annotations"] + val["annotations"])
    assert sum(a["iscrowd"] for a in train["annotations"] + val["annotations"]) == 11

    result = check_dataset(coco_tiny, tmp_path / "out")
    assert result["check_pass"], result["deep_check"]
    assert result["attributes"]["num_classes"] == 80 and result["dataset_path"] == coco_tiny.name

    lines = [line for _, line in conversion_log_lines(stats)]
    assert lines[0].startswith("converted COCO (standard COCO layout) -> ") and "train: 64 images" in lines[0]


def test_cli_check_dataset_on_coco_tiny(coco_tiny: Path, tmp_path: Path, caplog) -> None:
    from instseg_core.cli import main

    def run(*extra: str) -> int:
        return main(["run", "-c", "shapes_tiny", "-o", "Global.mode=check_dataset", "-o",
                     f"Global.dataset_dir={coco_tiny}", "-o", f"Global.output={tmp_path / 'out'}", *extra])

    with caplog.at_level(logging.INFO, logger="instseg"):
        assert run() == 1
        assert CONVERT_COCO in caplog.text and "Traceback" not in caplog.text
        caplog.clear()
        assert run(*CONVERT_COCO.split()) == 0
    assert "converted COCO (standard COCO layout)" in caplog.text and "dataset check passed" in caplog.text
    result = json.loads((tmp_path / "out" / "check_dataset_result.json").read_text())
    assert result["check_pass"] is True and result["attributes"]["num_classes"] == 80
