"""CVAT hand-off: the batch job's COCO dataset is what CVAT's "COCO 1.0" importer takes as is.

CVAT parses an uploaded COCO file with datumaro ("coco_instances"), turns every annotation into a
shape of the label with the same *name* in the task (RLE -> mask, polygon list -> polygon; the box
only when there is no segmentation) and matches each image to a task frame by ``file_name``
without its extension: the frame's path as uploaded, or that path below a common prefix (the
"root hint"). The checks below read our files that way, and through datumaro itself (PyPI's, in
its own venv: ``make test`` builds ``.venv-datumaro``; ``INSTSEG_DATUMARO_PYTHON`` points at
another interpreter).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from conftest import REPO, missing_tool
from instseg_core.masks import decode_rle, masks_to_xyxy
from instseg_core.structures import Instances
from pipelines.rows import ok_row
from pipelines.writers import iter_rows, write_coco_dataset

pytest.importorskip("ray")

DM_PYTHON_ENV = "INSTSEG_DATUMARO_PYTHON"
SHAPES = ["circle", "square", "triangle", "star"]  # the demo model's labels
NAMES = ["a/shapes_0.jpg", "a/shapes_1.jpg", "a/shapes_2.jpg", "b/shapes_0.jpg", "b/shape #4 é.jpg",
         "b/deeper/shapes_5.jpg"]  # the same stem in two folders, a name CVAT must not mangle


def _dm_python() -> str | None:
    cand = os.environ.get(DM_PYTHON_ENV) or str(REPO / ".venv-datumaro" / "bin" / "python")
    return cand if Path(cand).exists() else None


@pytest.fixture(scope="module")
def outputs(ray_local, tmp_path_factory) -> dict[str, Path]:
    """The job on the samples with the demo model: a folder input (one coco_dataset.json), and a
    manifest of the same images with ``coco_root`` (the sharded layout: coco/dataset-00000.json)."""
    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict

    work = tmp_path_factory.mktemp("cvat")
    src = work / "in"
    photos = sorted((REPO / "samples" / "shapes").glob("*.jpg"))
    for name, photo in zip(NAMES, photos):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, src / name)
    manifest = work / "images.txt"
    manifest.write_text("".join(f"{src / n}\n" for n in NAMES))
    common = dict(model_dir=str(REPO / "samples" / "model"), num_actors=1, batch_size=2, shard_size=2)
    run_batch_predict(BatchPredictConfig(input=str(src), output=str(work / "out"), coco_layout="single", **common))
    run_batch_predict(BatchPredictConfig(input=str(manifest), output=str(work / "out_manifest"), coco_root=str(src),
                                         coco_layout="sharded", **common))
    return {"work": work, "src": src, "folder": work / "out" / "coco_dataset.json",
            "manifest": work / "out_manifest" / "coco" / "dataset-00000.json", "out": work / "out"}


def _ring(h: int = 40, w: int = 60) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy - 20) ** 2 + (xx - 30) ** 2
    return (d2 <= 15 ** 2) & (d2 > 6 ** 2)


def _holes_and_parts(path: Path) -> list[np.ndarray]:
    """A dataset by write_coco_dataset of one image whose masks have a hole and two parts."""
    two = np.zeros((40, 60), bool)
    two[2:8, 2:10] = two[30:38, 45:58] = True
    masks = [_ring(), two]
    inst = Instances(masks_to_xyxy(np.stack(masks)), [0.9, 0.6], [0, 3], np.stack(masks), (40, 60))
    write_coco_dataset(iter([ok_row("/data/x/holes.png", inst, SHAPES, "r", "m")]), str(path), SHAPES,
                       image_root="/data")
    return masks


# ---------------------------------------------------------------------- CVAT's importer, re-read


def _stem(path: str) -> str:
    return posixpath.splitext(path)[0]


def _cvat_frames(file_names: list[str], frames: list[str]) -> dict[str, int | None]:
    """Which task frame each COCO image lands on, by CVAT's rule: ``file_name`` without extension
    equal to a frame's path without extension, else equal after prefixing the root hint (the
    frames' directory prefix found from the image with the most path parts)."""
    by_path = {_stem(f): k for k, f in enumerate(frames)}
    longest = PurePosixPath(_stem(max(file_names, key=lambda n: len(PurePosixPath(n).parts))))
    hint = None
    for f in frames:
        parts = PurePosixPath(_stem(f)).parts
        if parts[-len(longest.parts):] == longest.parts:
            frame_dir, item_dir = posixpath.dirname(f), str(longest.parent)
            hint = frame_dir[:len(frame_dir) - len(item_dir)].rstrip("/") if item_dir != "." else frame_dir
            break
    found = {}
    for name in file_names:
        k = by_path.get(_stem(name))
        if k is None and hint:
            k = by_path.get(posixpath.join(hint, _stem(name)))
        found[name] = k
    return found


@pytest.mark.parametrize("which", ["folder", "manifest"])
def test_coco_dataset_has_what_cvat_needs(outputs, which):
    doc = json.loads(outputs[which].read_text())
    assert [c["name"] for c in doc["categories"]] == SHAPES  # CVAT matches labels by name
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3, 4]  # category_id 0 would be "no label"
    images = {im["id"]: im for im in doc["images"]}
    assert sorted(images) == list(range(1, len(NAMES) + 1))  # sequential ints from 1
    assert sorted(a["id"] for a in doc["annotations"]) == list(range(1, len(doc["annotations"]) + 1))
    assert sorted(im["file_name"] for im in images.values()) == sorted(NAMES)  # relative to the input folder
    for a in doc["annotations"]:
        im = images[a["image_id"]]
        assert a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3, 4) and a["area"] > 0
        assert isinstance(a["segmentation"]["counts"], str)  # compressed RLE: a mask in CVAT
        assert a["segmentation"]["size"] == [im["height"], im["width"]]  # datumaro refuses other sizes
    assert doc["annotations"], "the demo model finds shapes on the samples"
    # a task made from the uploaded folder, and one from a bucket prefix: every image finds its frame
    for frames in (NAMES, [f"data/run 1/{n}" for n in NAMES]):
        shuffled = frames[::-1]
        found = _cvat_frames([im["file_name"] for im in images.values()], shuffled)
        assert {n: shuffled[k] for n, k in found.items()} == dict(zip(NAMES, frames))


def test_a_manifest_without_coco_root_names_images_by_their_full_path(outputs):
    """Why ``--coco-root`` exists: a manifest has no input folder, so file_names keep the whole
    path (bucket/key on S3), which a task's frames named below the folder do not end with."""
    from pipelines.writers import coco_file_name

    path = str(outputs["src"] / NAMES[0])
    assert coco_file_name(path, None) == path.lstrip("/")
    assert _cvat_frames([coco_file_name(path, None)], NAMES) == {path.lstrip("/"): None}
    assert coco_file_name("s3://bucket/imgs/a/x.jpg", "s3://bucket/imgs") == "a/x.jpg"


# ---------------------------------------------------------------------- datumaro


def test_datumaro_imports_our_files_as_coco_instances(outputs):
    python = _dm_python()
    if python is None:
        missing_tool(f"datumaro venv not found (run `make test`, or set {DM_PYTHON_ENV})")
    work = outputs["work"] / "datumaro"
    work.mkdir()
    holes = _holes_and_parts(work / "holes.json")
    files = [outputs["folder"], outputs["manifest"], work / "holes.json"]
    (work / "request.json").write_text(json.dumps({"out_dir": str(work), "datasets": [str(f) for f in files]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc = subprocess.run([python, str(REPO / "tests" / "datumaro_runner.py"), str(work / "request.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((work / "result.json").read_text())
    masks = np.load(work / "masks.npz")

    parts = sorted(str(p) for p in (outputs["out"] / "parts").glob("*.parquet"))
    rows = {r["uri"]: r for r in iter_rows(parts)}
    for d, (path, got) in enumerate(zip(files, result)):
        doc = json.loads(path.read_text())
        assert got["labels"] == SHAPES
        images = {im["id"]: im for im in doc["images"]}
        assert sorted(item["id"] for item in got["items"]) == sorted(_stem(im["file_name"]) for im in doc["images"])
        for i, item in enumerate(got["items"]):
            image = images[item["coco_id"]]
            assert item["id"] == _stem(image["file_name"])
            anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
            # one mask per annotation (datumaro adds a box to each; CVAT's reader does not)
            shapes = [(k, a) for k, a in enumerate(item["annotations"]) if a["type"] == "mask"]
            assert len(shapes) == len(anns)
            by_id = {a["id"]: a for a in anns}
            for k, shape in shapes:
                ann = by_id[shape["id"]]
                assert shape["label"] == SHAPES[ann["category_id"] - 1]
                assert shape["attributes"]["score"] == pytest.approx(ann["score"])
                assert shape["attributes"]["is_crowd"] is False
                np.testing.assert_array_equal(masks[f"{d}/{i}/{k}"], decode_rle([ann["segmentation"]])[0])
            if d < 2:  # the job's files: the masks of the rows, label for label
                row = rows[image["uri"]]
                want = sorted((it["label"], decode_rle([it["rle"]])[0].tobytes()) for it in row["instances"])
                have = sorted((s["label"], masks[f"{d}/{i}/{k}"].tobytes()) for k, s in shapes)
                assert have == want
    (item,) = result[2]["items"]
    assert item["id"] == "x/holes"
    shapes = {a["id"]: k for k, a in enumerate(item["annotations"]) if a["type"] == "mask"}
    assert sorted(shapes) == [1, 2]
    for ann_id, mask in zip((1, 2), holes):  # the hole and both parts survive
        np.testing.assert_array_equal(masks[f"2/0/{shapes[ann_id]}"], mask)
