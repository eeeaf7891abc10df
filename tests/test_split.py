"""Train/val re-split of a COCO pair built from the tiny COCO val2017 subset in ../shared."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from instseg_core.datasets.split import SplitError, split_coco_dataset

COCO_JSON = (Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny_val2017" / "annotations"
             / "instances_val2017.json")

pytestmark = pytest.mark.skipif(not COCO_JSON.is_file(), reason=f"{COCO_JSON} not found")


@pytest.fixture(scope="module")
def source() -> dict:
    return json.loads(COCO_JSON.read_text())


def make_pair(root: Path, src: dict, n_train: int = 50) -> Path:
    """Write instance_train.json (first n_train images) and instance_val.json (the rest)."""
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True)
    images = sorted(src["images"], key=lambda i: i["id"])
    for name, imgs in (("train", images[:n_train]), ("val", images[n_train:])):
        ids = {i["id"] for i in imgs}
        anns = [a for a in src["annotations"] if a["image_id"] in ids]
        (ann_dir / f"instance_{name}.json").write_text(
            json.dumps({"images": imgs, "annotations": anns, "categories": src["categories"]}))
    return root


def read(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instance_{split}.json").read_text())


def ann_key(a: dict) -> str:
    """Identity of an annotation independent of its (renumbered) id and image id."""
    return json.dumps({k: v for k, v in a.items() if k not in ("id", "image_id")}, sort_keys=True)


@pytest.mark.parametrize("train_pct,n_train", [(80, 64), (50, 40), (1, 1), (99, 79), (30, 24)])
def test_counts_ids_and_annotations(tmp_path, source, train_pct, n_train):
    root = make_pair(tmp_path, source)
    stats = split_coco_dataset(root, train_pct, 100 - train_pct, seed=3)
    train, val = read(root, "train"), read(root, "val")
    assert list(train)[:3] == ["categories", "images", "annotations"]
    assert len(train["images"]) == n_train == round(80 * train_pct / 100)
    assert len(val["images"]) == 80 - n_train
    assert stats["train"]["images"] == n_train and stats["num_images"] == 80

    ids = [i["id"] for i in train["images"] + val["images"]]
    assert len(set(ids)) == 80
    assert {i["file_name"] for i in train["images"] + val["images"]} == {i["file_name"] for i in source["images"]}
    assert stats["val_id_offset"] == 0  # COCO ids of the two halves do not collide: kept as they are

    # every annotation kept, with its own image (by file name), ids 1..N per file
    fname_of_src = {i["id"]: i["file_name"] for i in source["images"]}
    expected = Counter((fname_of_src[a["image_id"]], ann_key(a)) for a in source["annotations"])
    got: Counter = Counter()
    for d in (train, val):
        fname = {i["id"]: i["file_name"] for i in d["images"]}
        assert [a["id"] for a in d["annotations"]] == list(range(1, len(d["annotations"]) + 1))
        got.update((fname[a["image_id"]], ann_key(a)) for a in d["annotations"])
        assert d["categories"] == sorted(source["categories"], key=lambda c: c["id"])
    assert got == expected
    assert stats["num_annotations"] == len(source["annotations"]) == 815


def test_crowd_rle_kept_and_loadable(tmp_path, source):
    root = make_pair(tmp_path, source)
    split_coco_dataset(root, 70, 30)
    crowd_src = sorted(json.dumps(a["segmentation"]) for a in source["annotations"] if a["iscrowd"])
    crowd = sorted(json.dumps(a["segmentation"]) for s in ("train", "val")
                   for a in read(root, s)["annotations"] if a["iscrowd"])
    assert crowd == crowd_src and len(crowd) == 11
    import contextlib
    import io

    from pycocotools.coco import COCO

    for s in ("train", "val"):
        with contextlib.redirect_stdout(io.StringIO()):
            c = COCO(str(root / "annotations" / f"instance_{s}.json"))
        for a in c.dataset["annotations"]:
            if a["iscrowd"]:
                assert c.annToMask(a).sum() > 0


def test_colliding_ids_offset(tmp_path, source):
    root = make_pair(tmp_path, source, n_train=10)
    # make train ids 1..10 and val ids 1..70: they collide
    for s in ("train", "val"):
        p = root / "annotations" / f"instance_{s}.json"
        d = json.loads(p.read_text())
        remap = {i["id"]: k for k, i in enumerate(d["images"], 1)}
        d["images"] = [{**i, "id": remap[i["id"]]} for i in d["images"]]
        d["annotations"] = [{**a, "image_id": remap[a["image_id"]]} for a in d["annotations"]]
        p.write_text(json.dumps(d))
    stats = split_coco_dataset(root, 50, 50, seed=1)
    assert stats["val_id_offset"] == 10  # max train id (PaddleX's offset for ids starting at 1)
    imgs = read(root, "train")["images"] + read(root, "val")["images"]
    assert sorted(i["id"] for i in imgs) == list(range(1, 81))
    # annotations followed their image through the offset
    fname_of_src = {i["id"]: i["file_name"] for i in source["images"]}
    expected = Counter((fname_of_src[a["image_id"]], ann_key(a)) for a in source["annotations"])
    got: Counter = Counter()
    for s in ("train", "val"):
        d = read(root, s)
        fname = {i["id"]: i["file_name"] for i in d["images"]}
        got.update((fname[a["image_id"]], ann_key(a)) for a in d["annotations"])
    assert got == expected


def test_seeded_reproducibility(tmp_path, source):
    roots = [make_pair(tmp_path / f"r{i}", source) for i in range(3)]
    for r, seed in zip(roots, (5, 5, 6)):
        split_coco_dataset(r, 80, 20, seed=seed)
    a, b, c = (read(r, "val") for r in roots)
    assert a == b
    assert [i["id"] for i in a["images"]] != [i["id"] for i in c["images"]]


def test_backups_kept(tmp_path, source):
    root = make_pair(tmp_path, source)
    ann = root / "annotations"
    orig = {s: (ann / f"instance_{s}.json").read_bytes() for s in ("train", "val")}
    stats = split_coco_dataset(root, 80, 20)
    assert (ann / "instance_train.json.bak").read_bytes() == orig["train"]
    assert (ann / "instance_val.json.bak").read_bytes() == orig["val"]
    first = read(root, "train")
    stats = split_coco_dataset(root, 60, 40)
    assert json.loads((ann / "instance_train.json.bak.1").read_text()) == first
    assert (ann / "instance_train.json.bak").read_bytes() == orig["train"]  # never overwritten
    assert str(ann / "instance_val.json.bak.1") in stats["backups"]
    assert len(read(root, "train")["images"]) == 48


@pytest.mark.parametrize("tr,va", [(60, 30), (100, 0), (0, 100), (-10, 110), (70, 31)])
def test_bad_percents_rejected(tmp_path, source, tr, va):
    root = make_pair(tmp_path, source)
    before = sorted(p.name for p in (root / "annotations").iterdir())
    with pytest.raises(SplitError, match=rf"\({tr}\).*\({va}\)"):
        split_coco_dataset(root, tr, va)
    assert sorted(p.name for p in (root / "annotations").iterdir()) == before


def test_conflicting_category_names(tmp_path, source):
    root = make_pair(tmp_path, source)
    p = root / "annotations" / "instance_val.json"
    d = json.loads(p.read_text())
    d["categories"][0] = {**d["categories"][0], "name": "not-a-person"}
    p.write_text(json.dumps(d))
    with pytest.raises(SplitError, match="not-a-person"):
        split_coco_dataset(root, 80, 20)


def test_missing_files(tmp_path, source):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(SplitError, match="instance_train.json"):
        split_coco_dataset(tmp_path, 80, 20)


@pytest.mark.parametrize("content, message", [
    ({"images": ["a.jpg"]}, r"images\[0\] is not a JSON object"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [3]}, r"annotations\[0\] is not a JSON object"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": [1]}]},
     r"annotations\[0\] has no integer 'image_id'"),
    ({"categories": [{"id": [1], "name": "x"}]}, r"categories\[0\] has no integer 'id'"),
    (b'{"images": [], "info": "caf\xe9"}', "not UTF-8 text"),
])
def test_malformed_entries_name_the_file(tmp_path, content, message):
    """Used to end in AttributeError/TypeError/UnicodeDecodeError without naming the file."""
    path = tmp_path / "annotations" / "instance_train.json"
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(SplitError, match=message) as err:
        split_coco_dataset(tmp_path, 80, 20)
    assert str(path) in str(err.value)
    assert sorted(p.name for p in path.parent.iterdir()) == ["instance_train.json"]  # nothing written


def test_standard_coco_layout_gets_the_conversion_hint(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(SplitError, match="src_dataset_type=COCO"):
        split_coco_dataset(tmp_path, 80, 20)
