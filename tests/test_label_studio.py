"""Label Studio hand-off: the brush RLE codec, tasks and labeling config, the batch job's
``--label-studio``, ``python -m jobs.label_studio``, and a real Label Studio server importing them.

The server is ``label-studio`` from PyPI in its own venv (``make test`` builds ``.venv-labelstudio``;
``INSTSEG_LABELSTUDIO_PYTHON`` points at another interpreter). It is started once for this module
on loopback with a temp data dir (SQLite, no network, a user and API token made non-interactively)
and talked to through its own SDK (tests/label_studio_runner.py, run by that venv's interpreter).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, missing_tool
from instseg_core import brush_rle
from instseg_core.label_studio import image_reference, labeling_config, prediction_regions
from instseg_core.masks import decode_rle, masks_to_xyxy
from instseg_core.structures import Instances
from pipelines.label_studio import LabelStudioOptions, convert_output, write_label_studio, write_tasks
from pipelines.rows import error_row, ok_row

LS_PYTHON_ENV = "INSTSEG_LABELSTUDIO_PYTHON"
LABELS = ["cat", 'dog "big" & <small>']
SHAPES = ["circle", "square", "triangle", "star"]  # the demo model's labels
H, W = 37, 53


def _ls_python() -> str | None:
    cand = os.environ.get(LS_PYTHON_ENV) or str(REPO / ".venv-labelstudio" / "bin" / "python")
    return cand if Path(cand).exists() else None


# ---------------------------------------------------------------------- brush RLE


def _disk(cy: int, cx: int, r: int, h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _ring() -> np.ndarray:
    return _disk(18, 26, 15) & ~_disk(18, 26, 6)  # a hole


@pytest.mark.parametrize("mask", [
    _ring(), _ring() | _disk(3, 3, 2),  # holes, two parts
    np.zeros((H, W), bool), np.ones((1, 1), bool), np.zeros((1, 1), bool),
    np.ones((300, 250), bool),  # one run of 300k values: split over several records
    np.indices((31, 17)).sum(axis=0) % 2 == 0,  # a checkerboard: every run one pixel
    np.random.default_rng(0).random((64, 48)) > 0.3,
], ids=["ring", "two-parts", "empty", "one-pixel", "one-empty-pixel", "full-large", "checkerboard", "random"])
def test_brush_rle_round_trip(mask):
    rle = brush_rle.encode(mask)
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
    values = brush_rle.decode_values(rle)
    assert values.size == mask.size * 4
    np.testing.assert_array_equal(values.reshape(*mask.shape, 4), np.repeat(mask[..., None] * 255, 4, axis=2))
    np.testing.assert_array_equal(brush_rle.decode(rle, *mask.shape), mask)


def _pack(fields: list[tuple[int, int]]) -> list[int]:
    bits = "".join(format(v, f"0{n}b") for v, n in fields)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def test_brush_rle_decodes_literal_records_as_the_editor_writes_them():
    # 2 pixels = 8 values: a literal record of 5 values, then a repeat record of 3 (sizes 3, 4, 8, 16)
    literal = [0, 10, 20, 30, 40]
    stream = _pack([(8, 32), (7, 5), (2, 4), (3, 4), (7, 4), (15, 4),
                    (0, 1), (0, 2), (4, 3), *[(v, 8) for v in literal],
                    (1, 1), (0, 2), (2, 3), (255, 8)])
    np.testing.assert_array_equal(brush_rle.decode_values(stream), literal + [255, 255, 255])
    np.testing.assert_array_equal(brush_rle.decode(stream, 1, 2), [[True, True]])
    with pytest.raises(ValueError, match="ends before"):
        brush_rle.decode_values(stream[:5])
    with pytest.raises(ValueError, match="not 2x2x4"):
        brush_rle.decode(stream, 2, 2)
    with pytest.raises(ValueError, match="one \\[H, W\\] mask"):
        brush_rle.encode(np.zeros((1, 2, 2), bool))


def test_brush_rle_of_a_12_megapixel_mask_is_fast_and_small():
    big = np.zeros((3000, 4000), bool)
    big[500:2500, 1000:3000] = _disk(1000, 1000, 990, 2000, 2000)
    t0 = time.perf_counter()
    rle = brush_rle.encode(big)
    assert time.perf_counter() - t0 < 10.0  # vectorised: ~10 ms here; a loop over 12M pixels takes minutes
    assert len(rle) < 30_000  # ~4 runs per row
    np.testing.assert_array_equal(brush_rle.decode(rle, 3000, 4000), big)


# ---------------------------------------------------------------------- tasks and config


def test_image_reference_for_each_kind_of_uri(tmp_path):
    root = tmp_path / "data"
    assert image_reference(str(root / "a" / "x y#1é.jpg"), str(root)) == "/data/local-files/?d=a/x%20y%231%C3%A9.jpg"
    assert image_reference(f"file://{root}/b.png", str(root)) == "/data/local-files/?d=b.png"
    assert image_reference("/srv/img.jpg") == "/data/local-files/?d=srv/img.jpg"  # Label Studio's default root /
    with pytest.raises(ValueError, match="not below the Label Studio local files root"):
        image_reference(str(tmp_path / "elsewhere.jpg"), str(root))
    for uri in ("s3://bucket/k/img.jpg", "https://host/p/img.jpg?x=1", "gs://b/img.jpg"):
        assert image_reference(uri, str(root)) == uri


def test_labeling_config_lists_every_label_escaped():
    for kind, tag in (("brush", "BrushLabels"), ("polygon", "PolygonLabels")):
        view = ET.fromstring(labeling_config(LABELS, kind))
        image, control = list(view)
        assert (image.tag, image.get("name"), image.get("value")) == ("Image", "image", "$image")
        assert (control.tag, control.get("name"), control.get("toName")) == (tag, "label", "image")
        assert [label.get("value") for label in control] == LABELS
    with pytest.raises(ValueError, match="kind"):
        labeling_config(LABELS, "bbox")


def _instances(masks: list[np.ndarray], class_ids: list[int], scores: list[float]) -> Instances:
    if not masks:
        return Instances.empty((H, W)).to_rle()
    dense = np.stack(masks)
    return Instances(masks_to_xyxy(dense), scores, class_ids, dense, (H, W))


ROW_MASKS = [_ring(), _disk(5, 45, 4) | _disk(30, 5, 3), np.zeros((H, W), bool), _disk(20, 20, 3)]


def _rows(root: Path) -> list[dict]:
    """Ok rows (with holes, two parts, an empty mask, a low score), an error row, an image without
    instances, and a repeated image (the first row wins)."""
    a = ok_row(str(root / "a" / "one.jpg"), _instances(ROW_MASKS, [0, 1, 0, 1], [0.9, 0.7, 0.5, 0.1]), LABELS,
               "run-a", "m")
    b = ok_row(str(root / "b" / "two.jpg"), _instances([], [], []), LABELS, "run-b", "m")
    bad = error_row(str(root / "c.jpg"), "corrupt", "not an image", "run-a", "m")
    again = ok_row(str(root / "a" / "one.jpg"), _instances([_disk(5, 5, 2)], [0], [0.99]), LABELS, "run-c", "m")
    return [a, bad, b, again]


def test_tasks_hold_the_masks_scores_and_run_ids(tmp_path):
    out = tmp_path / "tasks.json"
    n = write_tasks(_rows(tmp_path), str(out), LABELS, LabelStudioOptions(min_score=0.2,
                                                                          local_files_root=str(tmp_path)))
    tasks = json.loads(out.read_text())
    assert n == len(tasks) == 2
    first, second = tasks
    assert first["data"] == {"image": "/data/local-files/?d=a/one.jpg", "uri": str(tmp_path / "a" / "one.jpg")}
    (pred,) = first["predictions"]
    assert pred["model_version"] == "run-a"  # the row's run, not the converter's
    regions = pred["result"]
    assert [r["value"]["brushlabels"] for r in regions] == [["cat"], [LABELS[1]]]  # empty mask and 0.1 left out
    assert [r["score"] for r in regions] == [0.9, 0.7] and pred["score"] == 0.7  # the least certain instance
    for region, mask in zip(regions, ROW_MASKS):
        assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image", "brushlabels")
        assert (region["original_width"], region["original_height"]) == (W, H)
        np.testing.assert_array_equal(brush_rle.decode(region["value"]["rle"], H, W), mask)
    assert second["predictions"] == [{"model_version": "run-b", "result": []}]  # nothing found: no score


def test_polygon_regions_in_percent_of_the_image():
    row = ok_row("/x/one.jpg", _instances(ROW_MASKS[:2], [0, 1], [0.9, 0.7]), LABELS, "r", "m")
    regions = prediction_regions(row["instances"], W, H, LABELS, kind="polygon")
    assert [r["id"] for r in regions] == ["i0p0", "i1p0", "i1p1"]  # the two parts of the second mask
    for r in regions:
        pts = np.asarray(r["value"]["points"])
        assert r["type"] == "polygonlabels" and r["value"]["closed"] is True
        assert pts.shape[1] == 2 and (pts >= 0).all() and (pts <= 100).all()
    # the ring's outer contour, drawn back at pixel scale, covers the ring and its hole
    pts = np.asarray(regions[0]["value"]["points"]) * [W / 100, H / 100]
    drawn = cv2.fillPoly(np.zeros((H, W), np.uint8), [np.round(pts).astype(np.int32)], 1).astype(bool)
    filled = _disk(18, 26, 15)
    assert (drawn & filled).sum() / (drawn | filled).sum() > 0.9


def test_rows_of_another_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="labelled"):
        write_tasks(_rows(tmp_path), str(tmp_path / "t.json"), ["cat", "bird"])
    assert not (tmp_path / "t.json").exists()


def test_large_outputs_are_split_and_a_rerun_replaces_the_files(tmp_path):
    rows = [ok_row(str(tmp_path / f"img{k}.jpg"), _instances([_disk(10, 10, 3)], [0], [0.8]), LABELS, "r", "m")
            for k in range(5)]
    out = tmp_path / "ls"
    small = LabelStudioOptions(max_tasks_per_file=2, local_files_root=str(tmp_path))
    result = write_label_studio(iter(rows), str(out), LABELS, small)
    assert result == {"files": ["tasks-00000-000.json", "tasks-00000-001.json", "tasks-00000-002.json"], "tasks": 5}
    assert [len(json.loads((out / f).read_text())) for f in result["files"]] == [2, 2, 1]
    by_bytes = write_label_studio(iter(rows), str(out), LABELS, LabelStudioOptions(max_bytes_per_file=1,
                                                                                   local_files_root=str(tmp_path)))
    assert len(by_bytes["files"]) == 5  # each file closed after the task that crossed the limit
    again = write_label_studio(iter(rows), str(out), LABELS, LabelStudioOptions(local_files_root=str(tmp_path)))
    assert again == {"files": ["tasks.json"], "tasks": 5}
    assert sorted(p.name for p in out.iterdir()) == ["config.xml", "tasks.json"]  # the split files are gone
    assert [len(json.loads((out / "tasks.json").read_text()))] == [5]
    failed = error_row(str(tmp_path / "bad.jpg"), "corrupt", "not an image", "r", "m")
    assert write_label_studio(iter([failed]), str(out), LABELS) == {"files": ["tasks.json"], "tasks": 0}
    assert json.loads((out / "tasks.json").read_text()) == []  # still importable, still where it is expected


def test_s3_output(s3_bucket, tmp_path):
    import fsspec

    base = f"s3://{s3_bucket}/run/label_studio"
    result = write_label_studio(iter(_rows(tmp_path)), base, LABELS, LabelStudioOptions(kind="polygon"))
    assert result == {"files": ["tasks.json"], "tasks": 2}
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(base)) == ["config.xml", "tasks.json"]
    tasks = json.loads(fs.cat(f"{base}/tasks.json"))
    assert tasks[0]["predictions"][0]["result"][0]["type"] == "polygonlabels"


# ---------------------------------------------------------------------- the job, the converter, the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A Label Studio server process of this module (started early: migrating a fresh SQLite
    database takes ~40 s, which the batch job below overlaps)."""

    def __init__(self, python: str, data_dir: Path, files_root: Path) -> None:
        self.token = secrets.token_hex(20)
        self.log = data_dir / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LABEL_STUDIO_USERNAME="test@example.com",
            LABEL_STUDIO_PASSWORD="test-password-1", LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",  # a fixed token, no login dance
            SENTRY_DSN="", LATEST_VERSION_CHECK="false",  # no calls to the outside
            LOCAL_FILES_SERVING_ENABLED="true", LOCAL_FILES_DOCUMENT_ROOT=str(files_root),
            # the server checks predictions against the labeling config (off by default: it stores anything)
            fflag_feat_utc_210_prediction_validation_15082025="true",
            SSRF_PROTECTION_ENABLED="false",  # its storages may reach the test's S3 server on loopback
            HOME=str(data_dir), PYTHONUNBUFFERED="1")  # its log says which port it took
        label_studio = Path(python).parent / "label-studio"
        port = _free_port()
        self.proc = subprocess.Popen(
            [str(label_studio), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=data_dir)
        self.url = f"http://127.0.0.1:{port}"

    def wait(self, timeout: float = 180) -> str:
        """The server's URL once /health answers (it moves to the next port if ours was taken)."""
        deadline = time.time() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Label Studio did not start:\n{self.log.read_text()[-3000:]}")
            for line in self.log.read_text(errors="replace").splitlines():
                if "Starting development server at " in line:
                    self.url = line.split(" at ", 1)[1].strip().rstrip("/")
            time.sleep(0.5)
        return self.url

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label_studio")


@pytest.fixture(scope="module")
def server_process(work):
    """The server, starting (None without the Label Studio venv)."""
    python = _ls_python()
    if python is None:
        yield None
        return
    (work / "ls_data").mkdir()
    server = _Server(python, work / "ls_data", work)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def job_output(work, server_process) -> Path:
    """The batch job with ``--label-studio`` on the samples and the demo model (a subprocess, its own
    local Ray): the images in two folders, one named with a space, '#' and a non-ASCII letter."""
    src = work / "in"
    photos = sorted((REPO / "samples" / "shapes").glob("*.jpg"))
    for k, p in enumerate(photos):
        folder = src / ("a" if k < 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / (p.name if k < 5 else "shape #5 é.jpg"))
    out = work / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "jobs.batch_predict", "--input", str(src), "--output", str(out),
                           "--model-dir", str(REPO / "samples" / "model"), "--ray-address", "local", "--num-cpus", "4",
                           "--batch-size", "2", "--shard-size", "2", "--label-studio",
                           "--label-studio-root", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def _row_masks(out: Path) -> dict[str, list[np.ndarray]]:
    """uri -> the rows' masks (non-empty ones), in instance order."""
    masks = {}
    for part in sorted((out / "parts").glob("*.parquet")):
        for row in pq.read_table(part).to_pylist():
            masks[row["uri"]] = [decode_rle([i["rle"]])[0] for i in row["instances"] if i["area"] > 0]
    return masks


def test_job_writes_tasks_and_config(job_output, work):
    summary = json.loads((job_output / "summary.json").read_text())
    tasks = json.loads((job_output / "label_studio" / "tasks.json").read_text())
    assert summary["label_studio_tasks"] == len(tasks) == 6 and summary["label_studio_files"] == ["tasks.json"]
    config = ET.fromstring((job_output / "label_studio" / "config.xml").read_text())
    assert [label.get("value") for label in config.find("BrushLabels")] == SHAPES
    masks = _row_masks(job_output)
    assert sorted(t["data"]["uri"] for t in tasks) == sorted(masks)
    for t in tasks:
        uri = t["data"]["uri"]
        rel = Path(uri).relative_to(work).as_posix()
        assert urllib.request.url2pathname(t["data"]["image"].split("?d=", 1)[1]) == rel
        (pred,) = t["predictions"]
        assert pred["model_version"] == summary["run_id"]
        assert len(pred["result"]) == len(masks[uri])
        for region, mask in zip(pred["result"], masks[uri]):
            assert region["value"]["brushlabels"][0] in SHAPES
            np.testing.assert_array_equal(brush_rle.decode(region["value"]["rle"], *mask.shape), mask)
    assert sum(len(m) for m in masks.values()) == summary["instances"]  # the demo model finds shapes


@pytest.fixture(scope="module")
def converted(job_output, work) -> dict:
    """``python -m jobs.label_studio`` on the job's output: polygons, and split files (as a large run
    gets them)."""
    from jobs import label_studio as job

    assert job.main([str(job_output), "--format", "polygon", "--out", str(work / "ls_poly"),
                     "--local-files-root", str(work)]) == 0
    split = convert_output(str(job_output), str(work / "ls_split"), LabelStudioOptions(
        max_tasks_per_file=4, local_files_root=str(work)))
    return {"split": split}


def test_converter_job(job_output, work, converted, capsys):
    from jobs import label_studio as job

    poly = json.loads((work / "ls_poly" / "tasks.json").read_text())
    brush = json.loads((job_output / "label_studio" / "tasks.json").read_text())
    assert [t["data"] for t in poly] == [t["data"] for t in brush]
    assert {r["type"] for t in poly for r in t["predictions"][0]["result"]} == {"polygonlabels"}
    assert ET.fromstring((work / "ls_poly" / "config.xml").read_text()).find("PolygonLabels") is not None
    # split files (read back below through a storage sync)
    assert converted["split"] == {"files": ["tasks-00000-000.json", "tasks-00000-001.json"], "tasks": 6}
    capsys.readouterr()
    for argv, message in (([str(work / "nothing")], "is not a directory"),
                          ([str(work / "in")], "no Parquet parts"),
                          ([str(job_output), "--local-files-root", str(work / "in" / "a")], "not below")):
        with pytest.raises(SystemExit) as e:
            job.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_merge_tasks_write_a_series_of_files_per_group(ray_local, job_output, work):
    """With more than one group of shards (large runs), each Ray task writes its own files and a
    rerun that fits one file replaces them with tasks.json."""
    from pipelines.batch_predict import finish_all
    from pipelines.merge import write_outputs
    from pipelines.sinks import list_parts, parts_by_shard

    out = work / "out_groups"
    shutil.copytree(job_output / "parts", out / "parts")
    parts = parts_by_shard(list_parts(str(out)))
    totals = finish_all(str(out), parts, None)
    options = LabelStudioOptions(local_files_root=str(work), model_version="x")
    written = write_outputs(str(out), totals["shards"], parts, SHAPES, image_root=str(work / "in"),
                            label_studio=options, shards_per_task=1)
    assert len(parts) > 2  # shards of at most 2 images, per folder
    assert written["label_studio"] == {"files": [f"tasks-{k:05d}-000.json" for k in range(len(parts))], "tasks": 6}
    series = [t for f in written["label_studio"]["files"] for t in json.loads((out / "label_studio" / f).read_text())]
    single = json.loads((job_output / "label_studio" / "tasks.json").read_text())
    assert series == single  # the same tasks, in the same (shard) order
    again = write_outputs(str(out), totals["shards"], parts, SHAPES, image_root=str(work / "in"), label_studio=options)
    assert again["label_studio"] == {"files": ["tasks.json"], "tasks": 6}
    assert sorted(p.name for p in (out / "label_studio").iterdir()) == ["config.xml", "tasks.json"]


def test_batch_job_refuses_a_local_files_root_above_nothing(work):
    from pipelines.batch_predict import BatchPredictConfig, JobSettingsError, _check_label_studio

    cfg = BatchPredictConfig(input=str(work / "in"), output=str(work / "o"), label_studio=True,
                             label_studio_root=str(work / "in" / "a"))
    with pytest.raises(JobSettingsError, match="label_studio_root: the input .* is not below"):
        _check_label_studio(cfg)
    cfg = BatchPredictConfig(input=str(work / "in"), output=str(work / "o"), label_studio=True,
                             label_studio_format="bbox")
    with pytest.raises(JobSettingsError, match="label_studio_format"):
        _check_label_studio(cfg)


@pytest.fixture(scope="module")
def label_studio(server_process) -> tuple[_Server, str]:
    """The running server and the interpreter of its venv."""
    if server_process is None:
        missing_tool(f"Label Studio venv not found (run `make test`, or set {LS_PYTHON_ENV})")
    server_process.wait()
    return server_process, _ls_python()


def test_real_label_studio_imports_our_tasks(label_studio, job_output, converted, work, s3_server, s3_bucket):
    server, python = label_studio
    ls_dir, images = job_output / "label_studio", work / "in"
    fetch = sorted({t["data"]["image"] for t in json.loads((ls_dir / "tasks.json").read_text())})
    bad = json.loads((ls_dir / "tasks.json").read_text())[:1]
    bad[0]["predictions"][0]["result"][0]["value"]["brushlabels"] = ["dog"]  # not in the config
    (work / "bad.json").write_text(json.dumps(bad))
    # images on S3: the tasks keep the s3:// URIs, an S3 storage of the project resolves them
    import boto3

    s3_rows = []
    for part in sorted((job_output / "parts").glob("*.parquet")):
        for row in pq.read_table(part).to_pylist():
            key = Path(row["uri"]).relative_to(work).as_posix()
            boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key=key,
                                                                  Body=Path(row["uri"]).read_bytes())
            s3_rows.append({**row, "uri": f"s3://{s3_bucket}/{key}"})
    write_tasks(iter(s3_rows), str(work / "s3_tasks.json"), SHAPES)
    request = {"url": server.url, "token": server.token, "out_dir": str(work), "projects": [
        {"title": "brush", "config": str(ls_dir / "config.xml"), "import": [str(ls_dir / "tasks.json")],
         "image_root": str(images), "fetch": fetch + ["/data/local-files/?d=in/a/missing.jpg"]},
        {"title": "polygons", "config": str(work / "ls_poly" / "config.xml"),
         "import": [str(work / "ls_poly" / "tasks.json")]},
        {"title": "split files, synced", "config": str(work / "ls_split" / "config.xml"),
         "tasks_storage": str(work / "ls_split")},
        {"title": "negative control", "config": str(ls_dir / "config.xml"),
         "import_rejected": [str(work / "bad.json")]},
        {"title": "images on S3", "config": str(ls_dir / "config.xml"), "import": [str(work / "s3_tasks.json")],
         "s3_storage": {"bucket": s3_bucket, "endpoint": s3_server, "region": "us-east-1", "key": "testing",
                        "secret": "testing"}, "resolve": True},
    ]}
    (work / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc = subprocess.run([python, str(REPO / "tests" / "label_studio_runner.py"), str(work / "request.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    result = json.loads((work / "result.json").read_text())
    sdk_masks = np.load(work / "masks.npz")
    assert "validation_errors" not in result, result["validation_errors"]  # the SDK's own prediction check
    brush, poly, split, control, on_s3 = result["projects"]
    assert control["rejected"] == [400] and control["tasks"] == []  # the server does check predictions

    ours = {t["data"]["uri"]: t for t in json.loads((ls_dir / "tasks.json").read_text())}
    row_masks = _row_masks(job_output)
    for p, project in enumerate((brush, split)):
        assert len(project["tasks"]) == 6
        for k, t in enumerate(project["tasks"]):
            mine = ours[t["data"]["uri"]]
            assert t["data"] == mine["data"]
            (pred,) = t["predictions"]
            (want,) = mine["predictions"]
            assert pred["model_version"] == want["model_version"] and pred["score"] == pytest.approx(want["score"])
            assert len(pred["result"]) == len(want["result"]) == len(row_masks[t["data"]["uri"]])
            for j, mask in enumerate(row_masks[t["data"]["uri"]]):  # decoded by Label Studio's own decoder
                np.testing.assert_array_equal(sdk_masks[f"{[0, 2][p]}/{k}/{j}"], mask)
    assert sum(len(t["predictions"][0]["result"]) for t in brush["tasks"]) > 0
    poly_ours = {t["data"]["uri"]: t for t in json.loads((work / "ls_poly" / "tasks.json").read_text())}
    for t in poly["tasks"]:
        assert t["predictions"][0]["result"] == poly_ours[t["data"]["uri"]]["predictions"][0]["result"]
    # the images open through the Local Files route, names with ' ', '#' and 'é' included
    for value in fetch:
        path = work / urllib.request.url2pathname(value.split("?d=", 1)[1])
        assert brush["fetched"][value] == [200, hashlib.sha256(path.read_bytes()).hexdigest()], value
    assert brush["fetched"]["/data/local-files/?d=in/a/missing.jpg"][0] == 404
    # and through the S3 storage: s3:// in the task, a URL of the server's in the editor that
    # redirects to a signed one, the same bytes
    assert len(on_s3["resolved"]) == 6
    for url, status, digest in on_s3["resolved"]:
        uri = base64.b64decode(url.split("fileuri=", 1)[1]).decode()
        assert uri.startswith(f"s3://{s3_bucket}/in/"), url
        assert [status, digest] == [200, hashlib.sha256((work / uri.split("/", 3)[3]).read_bytes()).hexdigest()]
