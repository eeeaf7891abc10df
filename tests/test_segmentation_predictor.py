"""``pipelines.SegmentationPredictor`` in a user's own Ray Data pipeline (issue 17 item 6).

The README's example runs as written on the session's local Ray (``ray_local``), with one change:
its output directory, ``out/``, is a temporary directory (Ray resolves relative paths in its
workers' directory, the repository). The Parquet it writes must hold one row per image of
``samples/shapes`` in the batch job's schema, with the instances that ``create_model(...)
.predict_arrays`` gives for the same pixels.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]

README_EXAMPLE = """\
import ray
from pipelines import SegmentationPredictor
ds = ray.data.read_images("samples/shapes", include_paths=True)
ds = ds.map_batches(SegmentationPredictor, fn_constructor_kwargs={"model_dir": "samples/model", "threshold": 0.5},
                    batch_size=4, compute=ray.data.ActorPoolStrategy(size=1))
ds.write_parquet("out/")   # rows with the batch job's row schema
"""


def _workers_cwd() -> str:
    import ray

    # a lambda travels by value (a function of this module would be imported by name, and the
    # workers cannot import test modules)
    return ray.get(ray.remote(num_cpus=0)(lambda: os.getcwd()).remote())


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:  # what read_images decodes with
        return np.asarray(im.convert("RGB"))


def test_readme_example_writes_batch_job_rows(ray_local, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from instseg_core import create_model
    from pipelines.rows import ROW_SCHEMA, image_id_for, ok_row, rows_to_table

    out = tmp_path / "out"
    code = README_EXAMPLE.replace('"out/"', repr(f"{out}/"))
    cwd = _workers_cwd()
    root = Path(cwd)
    if not (root / "samples" / "model").is_dir():  # the suite was started elsewhere than the repo
        code, root = code.replace('"samples/', f'"{REPO}/samples/'), REPO
    monkeypatch.chdir(cwd)  # where the user runs it: the driver in the directory Ray resolves paths in
    exec(compile(code, "README example", "exec"), {"__name__": "readme_example"})

    files = sorted(out.glob("*.parquet"))
    assert files
    for f in files:
        assert pq.read_schema(f).equals(ROW_SCHEMA, check_metadata=False), pq.read_schema(f)
    rows = sorted((r for f in files for r in pq.read_table(f).to_pylist()), key=lambda r: r["uri"])

    uris = sorted(str(root / "samples" / "shapes" / p.name) for p in (REPO / "samples" / "shapes").glob("*.jpg"))
    assert [r["uri"] for r in rows] == uris  # one row per image, absolute paths as the batch job's
    assert all(r["image_id"] == image_id_for(r["uri"]) for r in rows)
    assert {(r["status"], r["model"], r["run_id"]) for r in rows} == {("ok", "model", "")}

    # the same instances as the predictor itself gives for the same pixels (BGR)
    model = create_model(model_dir=REPO / "samples" / "model", threshold=0.5, mask_format="rle")
    expected = rows_to_table([ok_row(r["uri"], inst, model.labels, "", "model") for r, inst in zip(
        rows, model.predict_arrays([_rgb(Path(r["uri"]))[:, :, ::-1].copy() for r in rows], rle=True))]).to_pylist()
    assert sum(r["num_instances"] for r in rows) >= len(rows)  # the demo model finds shapes
    for got, want in zip(rows, expected):
        assert (got["width"], got["height"], got["num_instances"]) == (want["width"], want["height"],
                                                                         want["num_instances"]), got["uri"]
        for a, b in zip(got["instances"], want["instances"]):
            assert (a["class_id"], a["label"], a["rle"], a["area"]) == (b["class_id"], b["label"], b["rle"],
                                                                          b["area"]), got["uri"]
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)


def test_bytes_batches_grey_images_and_undecodable_files(tmp_path):
    """The read_binary_files layout, a grey image and a broken file, without Ray (the class is
    plain Python): a broken file is an error row, the others match the read_images layout's."""
    import cv2

    from pipelines import SegmentationPredictor
    from pipelines.rows import ROW_SCHEMA

    images = sorted((REPO / "samples" / "shapes").glob("*.jpg"))[:2]
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), cv2.imread(str(images[0]), cv2.IMREAD_GRAYSCALE))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[1].read_bytes()[:200])
    paths = [*images, grey, broken]

    predictor = SegmentationPredictor(model_dir=str(REPO / "samples" / "model"), threshold=0.5, batch_size=2)
    by_bytes = predictor({"bytes": np.array([p.read_bytes() for p in paths], dtype=object),
                          "uri": np.array([str(p) for p in paths])})
    assert by_bytes.schema.equals(ROW_SCHEMA)
    rows = by_bytes.to_pylist()
    assert [r["uri"] for r in rows] == [str(p) for p in paths]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    assert rows[3]["error_kind"] in ("truncated", "corrupt") and rows[3]["num_instances"] == 0

    decoded = [_rgb(p) for p in images] + [cv2.imread(str(grey), cv2.IMREAD_GRAYSCALE)]
    ragged = np.empty(len(paths), dtype=object)  # images of several shapes, as Ray Data passes them
    for i, img in enumerate(decoded + [np.zeros(0, np.uint8)]):
        ragged[i] = img
    by_array = predictor({"image": ragged, "path": np.array([str(p) for p in paths])}).to_pylist()
    assert by_array[3]["status"] == "error" and by_array[3]["error_kind"] == "unsupported"
    for a, b in zip(by_array[:3], rows[:3]):
        assert a["num_instances"] == b["num_instances"] and a["width"] == b["width"]
        assert [i["class_id"] for i in a["instances"]] == [i["class_id"] for i in b["instances"]]


def test_importing_the_package_loads_neither_paddle_nor_ray():
    import subprocess

    code = ("import sys; import pipelines; from pipelines import SegmentationPredictor; "
            "print('paddle' in sys.modules, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
