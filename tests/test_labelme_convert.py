"""LabelMe -> COCO conversion on the real LabelMe examples from ../shared (GPL: read and copied at test time only)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from instseg_core.datasets.labelme import ConvertError, convert_labelme_to_coco

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "labelme_instance_segmentation" / "examples"
ANNOTATED = SHARED / "instance_segmentation" / "data_annotated"
PRIMITIVES = SHARED / "primitives"
TUTORIAL = SHARED / "tutorial"

pytestmark = pytest.mark.skipif(not ANNOTATED.is_dir(), reason=f"LabelMe examples not found at {SHARED}")

VOC = ["2011_000003", "2011_000006", "2011_000025"]


def make_dataset(root: Path, *, names: list[str] = VOC, primitives: bool = False, tutorial: bool = False,
                 tutorial_image: bool = False, val: list[str] | None = None) -> Path:
    """PaddleX LabelMe layout in ``root``: images/, annotations/, train (and optional val) list."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    sources = [(ANNOTATED, n) for n in names]
    if primitives:
        sources.append((PRIMITIVES, "primitives"))
    for src, n in sources:
        shutil.copy(src / f"{n}.jpg", root / "images")
        shutil.copy(src / f"{n}.json", root / "annotations")
    stems = [n for _, n in sources]
    if tutorial:  # imagePath is "apc2016_obj3.json" and the photo is embedded as imageData
        shutil.copy(TUTORIAL / "apc2016_obj3.json", root / "annotations")
        if tutorial_image:
            shutil.copy(TUTORIAL / "apc2016_obj3.jpg", root / "images")
        stems.append("apc2016_obj3")
    val = val or []
    (root / "train_anno_list.txt").write_text("".join(f"annotations/{n}.json\n" for n in stems if n not in val))
    if val:
        (root / "val_anno_list.txt").write_text("".join(f"annotations/{n}.json\n" for n in val))
    return root


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instance_{split}.json").read_text())


def coco(root: Path, split: str):
    from pycocotools.coco import COCO
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / f"instance_{split}.json"))


def test_explicit_lists_counts_groups_and_ignore(tmp_path):
    root = make_dataset(tmp_path / "ds", val=["2011_000025"])
    before = hashes(root)
    stats = convert_labelme_to_coco(root)

    assert not stats["auto_split"] and stats["errors"] == []
    assert stats["ignored_shapes"] == 2  # one __ignore__ polygon in 2011_000003 and one in 2011_000006
    train, val = load(root, "train"), load(root, "val")
    assert list(train) == ["images", "categories", "annotations"]
    # 18 shapes - 2 ignored; person x2 and sofa x4 grouped -> 12 instances (9 train, 3 val)
    assert (stats["train"], stats["val"]) == ({"images": 2, "annotations": 9}, {"images": 1, "annotations": 3})
    assert len(train["annotations"]) + len(val["annotations"]) == 12

    names = {c["id"]: c["name"] for c in train["categories"]}
    assert "__ignore__" not in names.values()
    assert train["categories"] == val["categories"]  # both files list every category
    assert [c["id"] for c in train["categories"]] == list(range(1, len(names) + 1))
    assert names[1] == "person"  # first-seen order: 2011_000003 starts with a person
    # ids: annotation ids 1..N per file, image ids unique across files
    for d in (train, val):
        assert [a["id"] for a in d["annotations"]] == list(range(1, len(d["annotations"]) + 1))
        assert all(set(a) == {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
                   for a in d["annotations"])
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}

    # group_id 0: person in 2011_000003 (2 polygons) and sofa in 2011_000006 (4 polygons)
    parts = sorted(len(a["segmentation"]) for a in train["annotations"] if len(a["segmentation"]) > 1)
    assert parts == [2, 4]
    sofa = [a for a in train["annotations"] if names[a["category_id"]] == "sofa"]
    assert len(sofa) == 1 and len(sofa[0]["segmentation"]) == 4

    # loads in pycocotools; area/bbox agree with the decoded polygons (rasteriser differences only)
    for split in ("train", "val"):
        c = coco(root, split)
        for img in c.dataset["images"]:
            assert (root / "images" / img["file_name"]).is_file()
        for a in c.dataset["annotations"]:
            m = c.annToMask(a)
            assert abs(m.sum() - a["area"]) / a["area"] < 0.1
            ys, xs = np.nonzero(m)
            assert abs(xs.min() - a["bbox"][0]) <= 1.5 and abs(ys.min() - a["bbox"][1]) <= 1.5

    after = hashes(root)
    assert all(after[k] == v for k, v in before.items())  # no source file changed or deleted


def test_every_primitive_shape_type(tmp_path):
    root = make_dataset(tmp_path / "ds", names=[], primitives=True)
    (root / "val_anno_list.txt").write_text("")  # everything in train
    stats = convert_labelme_to_coco(root)
    assert stats["skipped_shapes"] == {"point": 1, "line": 1, "linestrip": 1}
    train = load(root, "train")
    names = {c["id"]: c["name"] for c in train["categories"]}
    by_name: dict[str, list[dict]] = {}
    for a in train["annotations"]:
        by_name.setdefault(names[a["category_id"]], []).append(a)
    assert {k: len(v) for k, v in by_name.items()} == {"rectangle": 2, "circle": 1, "polygon": 1, "octagon": 1}

    rect = by_name["rectangle"][0]  # points (32,35)-(132,135)
    assert rect["segmentation"] == [[32.0, 35.0, 132.0, 35.0, 132.0, 135.0, 32.0, 135.0]]
    assert rect["bbox"] == [32.0, 35.0, 101.0, 101.0]  # PIL fill includes the outline
    circle = by_name["circle"][0]  # centre (195,84), radius hypot(30,41)
    r = float(np.hypot(30, 41))
    assert len(circle["segmentation"][0]) >= 64
    assert circle["area"] == pytest.approx(np.pi * r * r, rel=0.05)
    pts = np.asarray(circle["segmentation"][0]).reshape(-1, 2)
    assert np.allclose(np.hypot(pts[:, 0] - 195, pts[:, 1] - 84), r)
    octagon = by_name["octagon"][0]  # 100x100 PNG mask at int((417.4, 305))
    assert octagon["area"] == 7275.0  # exact pixel count of the embedded mask
    assert octagon["bbox"][:2] == [417.0, 305.0]
    c = coco(root, "train")
    m = c.annToMask(octagon)
    assert abs(int(m.sum()) - 7275) < 300 and m[305:405, 417:517].sum() == m.sum()


def test_embedded_image_data_written(tmp_path):
    root = make_dataset(tmp_path / "ds", names=[], tutorial=True)
    (root / "val_anno_list.txt").write_text("")
    before = hashes(root)
    stats = convert_labelme_to_coco(root)
    written = root / "images" / "apc2016_obj3.jpg"  # imagePath ends in .json: extension from the data
    assert stats["images_written"] == [str(written)]
    from PIL import Image

    with Image.open(written) as im:
        assert im.size == (1210, 907)
    train = load(root, "train")
    assert train["images"][0]["file_name"] == "apc2016_obj3.jpg" and len(train["annotations"]) == 4
    after = hashes(root)
    assert all(after[k] == v for k, v in before.items())
    # a second run finds the written file and writes nothing; previous outputs become .bak
    stats2 = convert_labelme_to_coco(root)
    assert stats2["images_written"] == []
    assert (root / "annotations" / "instance_train.json.bak").is_file()


def test_image_path_mismatch_found_by_stem(tmp_path):
    root = make_dataset(tmp_path / "ds", names=["2011_000003"], tutorial=True, tutorial_image=True)
    # a renamed photo: imagePath says .jpg, the file on disk is .png
    src = root / "images" / "2011_000003.jpg"
    from PIL import Image

    Image.open(src).save(root / "images" / "2011_000003.png")
    src.unlink()
    jp = root / "annotations" / "2011_000003.json"  # Windows-style relative path
    jp.write_text(json.dumps({**json.loads(jp.read_text()), "imagePath": "..\\images\\2011_000003.jpg"}))
    (root / "val_anno_list.txt").write_text("")
    stats = convert_labelme_to_coco(root)
    assert stats["images_written"] == [] and stats["errors"] == []
    found = {r["image_path"]: r["found"] for r in stats["images_resolved"]}
    assert found == {"..\\images\\2011_000003.jpg": "2011_000003.png", "apc2016_obj3.json": "apc2016_obj3.jpg"}
    assert sorted(i["file_name"] for i in load(root, "train")["images"]) == ["2011_000003.png", "apc2016_obj3.jpg"]


def test_unresolvable_image_reported(tmp_path):
    root = make_dataset(tmp_path / "ds", val=["2011_000025"])
    (root / "images" / "2011_000006.jpg").unlink()
    stats = convert_labelme_to_coco(root)
    assert len(stats["errors"]) == 1 and stats["errors"][0]["json"].endswith("2011_000006.json")
    assert stats["train"]["images"] == 1


def test_size_mismatch_uses_real_size(tmp_path):
    root = make_dataset(tmp_path / "ds", names=["2011_000025"])
    jp = root / "annotations" / "2011_000025.json"
    d = json.loads(jp.read_text())
    d["imageWidth"] = 999
    jp.write_text(json.dumps(d))
    (root / "val_anno_list.txt").write_text("")
    stats = convert_labelme_to_coco(root)
    assert any("999" in w for w in stats["warnings"])
    assert load(root, "train")["images"][0]["width"] == 500


def _split_of(root: Path) -> tuple[list[str], list[str]]:
    return ((root / "train_anno_list.txt").read_text().split(), (root / "val_anno_list.txt").read_text().split())


def test_auto_split_reproducible_and_backed_up(tmp_path):
    roots = [make_dataset(tmp_path / f"ds{i}", primitives=True, tutorial=True) for i in range(3)]
    original = (roots[0] / "train_anno_list.txt").read_text()
    before = hashes(roots[0])
    stats = [convert_labelme_to_coco(r, seed=s) for r, s in zip(roots, (7, 7, 1))]
    assert all(s["auto_split"] for s in stats)
    splits = [_split_of(r) for r in roots]
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]  # 5 files: another seed gives another order (checked for these seeds)
    train, val = splits[0]
    assert (len(train), len(val)) == (4, 1)  # int(0.8 * 5)
    assert sorted(train + val) == sorted(original.split())
    assert (stats[0]["train"]["images"], stats[0]["val"]["images"]) == (4, 1)

    r = roots[0]
    assert (r / "train_anno_list.txt.bak").read_text() == original
    after = hashes(r)
    moved = {"train_anno_list.txt"}
    assert all(after[k] == v for k, v in before.items() if k not in moved)
    assert set(before) - set(after) == set()  # nothing deleted (train list rewritten, old one in .bak)

    # custom ratio
    r2 = make_dataset(tmp_path / "ratio", primitives=True, tutorial=True)
    convert_labelme_to_coco(r2, seed=7, train_ratio=0.4)
    assert tuple(map(len, _split_of(r2))) == (2, 3)


def test_outputs_backed_up_never_deleted(tmp_path):
    root = make_dataset(tmp_path / "ds", val=["2011_000025"])
    out = root / "annotations" / "instance_train.json"
    out.write_text("old0")
    (root / "annotations" / "instance_train.json.bak").write_text("old-bak")
    convert_labelme_to_coco(root)
    convert_labelme_to_coco(root)
    ann = root / "annotations"
    assert (ann / "instance_train.json.bak").read_text() == "old-bak"
    assert (ann / "instance_train.json.bak.1").read_text() == "old0"
    assert json.loads((ann / "instance_train.json.bak.2").read_text()) == load(root, "train")
    assert (ann / "instance_val.json.bak").is_file() and not (ann / "instance_val.json.bak.1").exists()


def test_paddlex_layout_without_list_files_uses_every_labelme_file(tmp_path):
    """images/ + annotations/*.json without train_anno_list.txt used to be refused: now every LabelMe
    file is converted (seeded 80/20 split) and no list file is written."""
    root = make_dataset(tmp_path / "ds")
    (root / "train_anno_list.txt").unlink()
    stats = convert_labelme_to_coco(root)
    assert stats["layout"] == "folder" and stats["errors"] == [] and stats["images_linked"] == 0
    assert (stats["train"]["images"], stats["val"]["images"]) == (2, 1)
    assert stats["train"]["annotations"] + stats["val"]["annotations"] == 12
    assert not (root / "train_anno_list.txt").exists() and not (root / "val_anno_list.txt").exists()
    names = sorted(i["file_name"] for s in ("train", "val") for i in load(root, s)["images"])
    assert names == [f"{n}.jpg" for n in VOC]  # already under images/: used in place


def test_val_list_without_train_list(tmp_path):
    root = make_dataset(tmp_path / "ds", val=["2011_000025"])
    (root / "train_anno_list.txt").unlink()
    before = hashes(root)
    from instseg_core.datasets.check import DatasetError

    with pytest.raises(DatasetError, match="train_anno_list.txt") as err:
        convert_labelme_to_coco(root)
    assert isinstance(err.value, ConvertError) and isinstance(err.value, ValueError)
    assert hashes(root) == before


def test_listed_file_missing(tmp_path):
    root = make_dataset(tmp_path / "ds")
    with open(root / "train_anno_list.txt", "a") as f:
        f.write("annotations/nope.json\n")
    with pytest.raises(ConvertError, match="nope.json"):
        convert_labelme_to_coco(root)


def test_corrupt_json_names_file_and_changes_nothing(tmp_path):
    root = make_dataset(tmp_path / "ds")  # no val list: would auto-split if it got that far
    (root / "annotations" / "2011_000006.json").write_text('{"shapes": [')
    before = hashes(root)
    with pytest.raises(ConvertError, match="2011_000006.json"):
        convert_labelme_to_coco(root)
    assert hashes(root) == before


# ----------------------------------------------------------------------------- LabelMe's own layout (issue 16, item 11)

EXAMPLE = ANNOTATED.parent  # labels.txt + data_annotated/ (JSON next to each photo), as LabelMe ships it
VOC_LABELS = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
              "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv/monitor"]


def labelme_layout(root: Path, *, labels: bool = True, images: bool = True) -> Path:
    """A copy of LabelMe's instance-segmentation example: ``labels.txt`` and ``data_annotated/``."""
    (root / "data_annotated").mkdir(parents=True)
    for n in VOC:
        shutil.copy(ANNOTATED / f"{n}.json", root / "data_annotated")
        if images:
            shutil.copy(ANNOTATED / f"{n}.jpg", root / "data_annotated")
    if labels:
        shutil.copy(EXAMPLE / "labels.txt", root)
    return root


def test_labelme_own_layout_with_labels_txt(tmp_path):
    root = labelme_layout(tmp_path / "ds")
    before = hashes(root)
    stats = convert_labelme_to_coco(root)

    assert stats["layout"] == "folder" and stats["errors"] == [] and stats["labels_file"] == str(root / "labels.txt")
    assert stats["images_linked"] + stats["images_copied"] == 3 and stats["ignored_shapes"] == 2
    train, val = load(root, "train"), load(root, "val")
    # labels.txt order (after __ignore__ and _background_) gives the ids, every label is a category
    assert train["categories"] == val["categories"]
    assert [(c["id"], c["name"]) for c in train["categories"]] == list(enumerate(VOC_LABELS, 1))
    assert stats["num_classes"] == 20
    names = {c["id"]: c["name"] for c in train["categories"]}
    used = sorted({names[a["category_id"]] for d in (train, val) for a in d["annotations"]})
    assert used == ["bottle", "bus", "car", "chair", "person", "sofa"]
    assert len(train["annotations"]) + len(val["annotations"]) == 12
    # photos placed under images/ with their path below the root; the sources untouched
    files = sorted(i["file_name"] for d in (train, val) for i in d["images"])
    assert files == [f"data_annotated/{n}.jpg" for n in VOC]
    for f in files:
        assert (root / "images" / f).read_bytes() == (root / f).read_bytes()
    after = hashes(root)
    assert all(after[k] == v for k, v in before.items())
    assert not (root / "train_anno_list.txt").exists() and stats["backups"] == []

    # the result passes the dataset check; a second conversion reuses the placed photos
    from instseg_core.datasets.check import check_dataset

    result = check_dataset(root, tmp_path / "out")
    assert result["check_pass"] and result["attributes"]["num_classes"] == 20
    again = convert_labelme_to_coco(root)
    assert again["images_linked"] + again["images_copied"] == 0 and again["errors"] == []
    assert load(root, "train") == train and len(again["backups"]) == 2


def test_flat_folder_without_labels_txt(tmp_path):
    """JSON and photos side by side in the dataset folder itself; first-seen category order."""
    root = tmp_path / "flat"
    root.mkdir()
    for n in VOC:
        shutil.copy(ANNOTATED / f"{n}.json", root)
        shutil.copy(ANNOTATED / f"{n}.jpg", root)
    (tmp_path / "labels.txt").write_text("__ignore__\nperson\n")  # in the parent: not read, but mentioned
    stats = convert_labelme_to_coco(root, seed=3)
    assert stats["labels_file"] is None and any("is not used" in w for w in stats["warnings"])
    files = sorted(i["file_name"] for s in ("train", "val") for i in load(root, s)["images"])
    assert files == [f"{n}.jpg" for n in VOC]
    assert all((root / "images" / f).is_file() for f in files)
    cats = load(root, "train")["categories"]
    assert [c["id"] for c in cats] == list(range(1, 7)) and "__ignore__" not in {c["name"] for c in cats}


def test_labels_txt_in_paddlex_layout(tmp_path):
    root = make_dataset(tmp_path / "ds", val=["2011_000025"])
    (root / "labels.txt").write_text("__ignore__\n_background_\n\nsofa\nperson\nbottle\nchair\nbus\ncar\ndog\n")
    stats = convert_labelme_to_coco(root)
    assert stats["categories"] == ["sofa", "person", "bottle", "chair", "bus", "car", "dog"]
    names = {c["id"]: c["name"] for c in load(root, "val")["categories"]}
    assert names[1] == "sofa" and names[2] == "person" and names[7] == "dog"


def test_label_missing_from_labels_txt_is_an_error(tmp_path):
    root = labelme_layout(tmp_path / "ds")
    (root / "labels.txt").write_text("__ignore__\n_background_\nperson\nbottle\n")
    before = hashes(root)
    with pytest.raises(ConvertError, match=r"not in .*labels.txt") as err:
        convert_labelme_to_coco(root)
    assert "'sofa'" in str(err.value) and "nothing was written" in str(err.value)
    assert hashes(root) == before


def test_read_labels(tmp_path):
    from instseg_core.datasets.labelme import read_labels

    path = tmp_path / "labels.txt"
    path.write_text("\ufeff__ignore__\r\n_background_\r\n cat \r\n\r\ndog\r\n", encoding="utf-8")
    assert read_labels(path) == ["cat", "dog"]
    assert read_labels(EXAMPLE / "labels.txt") == VOC_LABELS
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(ConvertError, match=r"labels.txt, line 3: label 'cat' is listed twice"):
        read_labels(path)
    path.write_text("__ignore__\n_background_\n")
    with pytest.raises(ConvertError, match="lists no label"):
        read_labels(path)


@pytest.mark.parametrize("layout", ["folder", "paddlex_lists"])
def test_no_image_found_stops_before_writing(tmp_path, layout):
    """Used to write empty COCO files and back up the list file; now one error naming the folders."""
    if layout == "folder":
        root = labelme_layout(tmp_path / "ds", images=False)
    else:
        root = make_dataset(tmp_path / "ds")  # no val list: would auto-split (and back up) if it went on
        for n in VOC:
            (root / "images" / f"{n}.jpg").unlink()
    before = hashes(root)
    with pytest.raises(ConvertError) as err:
        convert_labelme_to_coco(root)
    msg = str(err.value)
    assert msg.startswith("no image found for any of the 3 LabelMe file(s)") and "nothing was written" in msg
    assert str(root / "images") in msg and "\n" not in msg
    assert hashes(root) == before
    assert not (root / "annotations" / "instance_train.json").exists()


def test_no_labelme_file(tmp_path):
    (tmp_path / "ds" / "sub").mkdir(parents=True)
    (tmp_path / "ds" / "sub" / "other.json").write_text('{"images": []}')
    with pytest.raises(ConvertError, match=r"no LabelMe file .* found in .*ds.*accepted layouts"):
        convert_labelme_to_coco(tmp_path / "ds")
    with pytest.raises(ConvertError, match="does not exist"):
        convert_labelme_to_coco(tmp_path / "nope")


def test_taken_image_target_is_an_error(tmp_path):
    root = labelme_layout(tmp_path / "ds")
    taken = root / "images" / "data_annotated" / "2011_000006.jpg"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"another photo")
    before = hashes(root)
    with pytest.raises(ConvertError, match=r"2011_000006.jpg already exists and is not a copy of"):
        convert_labelme_to_coco(root)
    assert hashes(root) == before


def test_single_file_goes_to_train(tmp_path):
    root = tmp_path / "one"
    root.mkdir()
    shutil.copy(ANNOTATED / "2011_000003.json", root)
    shutil.copy(ANNOTATED / "2011_000003.jpg", root)
    stats = convert_labelme_to_coco(root)
    assert (stats["train"]["images"], stats["val"]["images"]) == (1, 0)  # int(0.8 * 1) = 0 would leave train empty


@pytest.mark.parametrize("src_type", ["labelme", "LabelMe", "LABELME", " Labelme "])
def test_cli_converts_labelme_layout_in_any_case(tmp_path, src_type, caplog):
    import logging

    from instseg_core.cli import main

    root = labelme_layout(tmp_path / "ds")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="instseg"):
        rc = main(["run", "-c", "shapes_tiny", "-o", "Global.mode=check_dataset", "-o", f"Global.dataset_dir={root}",
                   "-o", f"Global.output={out}", "-o", "CheckDataset.convert.enable=True",
                   "-o", f"CheckDataset.convert.src_dataset_type={src_type}"])
    assert rc == 0, caplog.text
    assert "converted LabelMe (LabelMe files found in the folder)" in caplog.text
    assert "20 categories from" in caplog.text and "dataset check passed" in caplog.text
    assert json.loads((out / "check_dataset_result.json").read_text())["check_pass"] is True


@pytest.mark.parametrize("src_type", ["VOC", "None"])
def test_cli_rejects_unknown_src_dataset_type(tmp_path, src_type, caplog):
    from instseg_core.cli import main

    root = labelme_layout(tmp_path / "ds")
    before = hashes(root)
    rc = main(["run", "-c", "shapes_tiny", "-o", "Global.mode=check_dataset", "-o", f"Global.dataset_dir={root}",
               "-o", f"Global.output={tmp_path / 'out'}", "-o", "CheckDataset.convert.enable=True",
               "-o", f"CheckDataset.convert.src_dataset_type={src_type}"])
    assert rc == 1
    assert "src_dataset_type must be LabelMe or COCO (any case)" in caplog.text and "Traceback" not in caplog.text
    assert hashes(root) == before


def test_malformed_shapes_name_the_file(tmp_path):
    """A list as group_id used to end in "TypeError: unhashable type" and NaN coordinates were written
    into the COCO file (invalid JSON); a shape that is not an object raised AttributeError."""
    root = tmp_path / "ds"
    root.mkdir()
    shutil.copy(ANNOTATED / "2011_000003.jpg", root)
    data = json.loads((ANNOTATED / "2011_000003.json").read_text())
    first = data["shapes"][0]
    jp = root / "2011_000003.json"
    jp.write_text(json.dumps({**data, "shapes": [{**first, "group_id": [1]}, {**first, "group_id": [1]}, "oops"]}))
    stats = convert_labelme_to_coco(root)
    assert stats["train"]["annotations"] == 2 and stats["skipped_shapes"] == {"not_an_object": 1}
    assert any("unusable group_id [1]" in w for w in stats["warnings"])

    jp.write_text(json.dumps({**data, "shapes": [{**first, "points": [[1, float("nan")], [3, 4], [5, 6]]}]}))
    before = hashes(root)
    with pytest.raises(ConvertError, match=r"2011_000003.json: shape 0 \('person'\) has a NaN or infinite coordinate"):
        convert_labelme_to_coco(root)
    assert hashes(root) == before
