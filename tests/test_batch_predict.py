"""The Ray batch-labelling pipeline on a real local Ray cluster and a loopback S3 server."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO

pytest.importorskip("ray")

from instseg_core import create_model  # noqa: E402
from instseg_core.masks import decode_rle  # noqa: E402
from pipelines.batch_predict import BatchPredictConfig, run_batch_predict  # noqa: E402
from pipelines.rows import image_id_for, table_instances  # noqa: E402
from pipelines.sinks import list_parts  # noqa: E402

MODEL = "MaskRCNN-ResNet50-FPN"



def _rows(output: str) -> list[dict]:
    import fsspec

    rows = []
    for uri in list_parts(output):
        with fsspec.open(uri, "rb") as f:
            rows.extend(pq.read_table(f).to_pylist())
    return rows


def _good_images(test_images, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"good_{i:03d}.jpg"
        p.write_bytes(Path(test_images[i % len(test_images)]).read_bytes())
        out.append(p)
    return out


def _bad_and_odd_images(test_images, folder: Path) -> dict[str, str]:
    """name -> expected status/kind ("ok" or the error kind)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = cv2.imread(test_images[0])
    (folder / "truncated.jpg").write_bytes(Path(test_images[0]).read_bytes()[:4000])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a jpeg")
    cv2.imwrite(str(folder / "gray.png"), cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "rgba.png"), cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(folder / "deep16.png"), photo.astype(np.uint16) * 257)
    rotated = Image.fromarray(cv2.cvtColor(photo, cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    rotated.save(folder / "exif_rotated.jpg", exif=exif)
    Image.new("RGB", (3000, 2500), (40, 90, 160)).save(folder / "huge.png")  # 7.5 MP > max_pixels below
    return {"truncated.jpg": "truncated", "zero.jpg": "empty", "text.jpg": "corrupt", "gray.png": "ok",
            "rgba.png": "ok", "deep16.png": "ok", "exif_rotated.jpg": "ok", "huge.png": "too_large"}


def test_local_run_bad_inputs_and_outputs(ray_local, tiny_model_dirs, test_images, tmp_path):
    src = tmp_path / "in"
    good = _good_images(test_images, src / "nested", 6)
    expected = _bad_and_odd_images(test_images, src)
    out = tmp_path / "out"
    cfg = BatchPredictConfig(input=str(src), output=str(out), model_dir=str(tiny_model_dirs(MODEL)),
                             batch_size=4, rows_per_file=4, max_pixels=5_000_000, progress_interval_s=0.5)
    summary = run_batch_predict(cfg)

    rows = _rows(str(out))
    by_name = {Path(r["uri"]).name: r for r in rows}
    assert len(rows) == len(by_name) == len(good) + len(expected) == summary["images_written"]
    for name, want in expected.items():
        r = by_name[name]
        assert (r["status"] if want == "ok" else r["error_kind"]) == want, (name, r["error"])
        if want != "ok":
            assert r["status"] == "error" and name in r["error"]
    assert (by_name["exif_rotated.jpg"]["height"], by_name["exif_rotated.jpg"]["width"]) == (640, 480)
    assert summary["by_status"] == {"ok": len(good) + 4, "error": 4}
    assert summary["errors_by_kind"] == {"truncated": 1, "empty": 1, "corrupt": 1, "too_large": 1}
    assert json.loads((out / "summary.json").read_text())["run_id"] == summary["run_id"]

    # masks in the rows are the predictor's masks, RLE-encoded
    model = create_model(model_dir=tiny_model_dirs(MODEL))
    r = by_name[good[0].name]
    direct = model.predict_arrays([cv2.imread(str(good[0]))])[0]
    stored = table_instances(r)
    np.testing.assert_array_equal(stored.dense_masks(), direct.dense_masks())
    np.testing.assert_allclose(stored.boxes, direct.boxes, atol=1e-3)
    assert r["image_id"] == image_id_for(str(good[0]))

    # the COCO dataset JSON loads in pycocotools and round-trips the RLE
    from pycocotools.coco import COCO

    coco = COCO(str(out / "coco_dataset.json"))
    assert len(coco.getImgIds()) == len(good) + 4
    assert sorted(coco.imgs) == list(range(1, len(good) + 5))  # sequential COCO ids (exact as doubles)
    assert sorted(coco.anns) == list(range(1, len(coco.anns) + 1))
    coco_id = next(i for i, im in coco.imgs.items() if im["uri"] == r["uri"])
    assert coco.imgs[coco_id]["file_name"] == f"nested/{good[0].name}"  # relative to --input
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[coco_id]))
    assert len(anns) == len(direct)
    np.testing.assert_array_equal(np.sort([coco.annToMask(a).sum() for a in anns]),
                                  np.sort(direct.dense_masks().sum(axis=(1, 2))))
    results = json.loads((out / "coco_results.json").read_text())
    assert len(results) == summary["instances"]
    assert decode_rle([results[0]["segmentation"]]).shape[0] == 1


def test_rerun_resumes_without_duplicates(ray_local, tiny_model_dirs, test_images, tmp_path):
    src = tmp_path / "in"
    _good_images(test_images, src, 5)
    out = tmp_path / "out"
    cfg = dict(input=str(src), output=str(out), model_dir=str(tiny_model_dirs(MODEL)), batch_size=2, rows_per_file=2)
    first = run_batch_predict(BatchPredictConfig(**cfg))
    assert first["images_this_run"] == 5
    _good_images(test_images, src / "more", 3)  # the input grew
    second = run_batch_predict(BatchPredictConfig(**cfg))
    assert second["images_before_this_run"] == 5 and second["images_this_run"] == 3
    uris = [r["uri"] for r in _rows(str(out))]
    assert len(uris) == len(set(uris)) == 8


def test_relative_paths_mean_the_drivers_working_dir(ray_local, tiny_model_dirs, test_images, tmp_path,
                                                     monkeypatch):
    """Ray's workers run in the directory the cluster started in, not the driver's: relative
    --input/--output/--model-dir are taken from the driver's working directory (they used to be
    listed and written by tasks in their own)."""
    _good_images(test_images, tmp_path / "in", 3)
    model = tiny_model_dirs(MODEL)
    monkeypatch.chdir(tmp_path)
    s = run_batch_predict(BatchPredictConfig(input="in", output="out", model_dir=os.path.relpath(model),
                                             batch_size=2))
    assert s["images_written"] == 3 and s["by_status"] == {"ok": 3}
    assert len(_rows(str(tmp_path / "out"))) == 3 and (tmp_path / "out" / "coco_dataset.json").exists()
    assert s["input"] == str(tmp_path / "in") and s["output"] == str(tmp_path / "out")


def test_manifests(ray_local, tiny_model_dirs, test_images, tmp_path):
    import pyarrow as pa

    good = _good_images(test_images, tmp_path / "imgs", 3)
    (tmp_path / "list.txt").write_text("# images\n" + "\n".join(f"imgs/{p.name}" for p in good) + "\n")
    (tmp_path / "list.csv").write_text("path,split\n" + "".join(f"{p},train\n" for p in good))
    pq.write_table(pa.table({"uri": [str(p) for p in good], "n": [1, 2, 3]}), tmp_path / "list.parquet")
    for manifest in ("list.txt", "list.csv", "list.parquet"):
        out = tmp_path / f"out_{manifest}"
        s = run_batch_predict(BatchPredictConfig(input=str(tmp_path / manifest), output=str(out),
                                                 model_dir=str(tiny_model_dirs(MODEL)), batch_size=2))
        assert s["images_total"] == 3 and s["by_status"] == {"ok": 3}, manifest
        assert sorted(r["uri"] for r in _rows(str(out))) == sorted(str(p) for p in good)


def test_s3_input_and_output(ray_local, tiny_model_dirs, test_images, s3_bucket, s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for i in range(4):
        s3.put_object(Bucket=s3_bucket, Key=f"images/{i}.jpg", Body=Path(test_images[i % len(test_images)]).read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="images/broken.jpg", Body=b"\xff\xd8\xff garbage")
    # the model dir itself lives on S3 too
    for f in Path(tiny_model_dirs(MODEL)).iterdir():
        s3.put_object(Bucket=s3_bucket, Key=f"models/tiny/{f.name}", Body=f.read_bytes())
    out = f"s3://{s3_bucket}/labels/run1"
    s = run_batch_predict(BatchPredictConfig(input=f"s3://{s3_bucket}/images/", output=out, model_name=MODEL,
                                             model_dir=f"s3://{s3_bucket}/models/tiny", batch_size=2))
    assert s["images_total"] == 5 and s["images_this_run"] == 5
    assert s["by_status"] == {"ok": 4, "error": 1}
    rows = _rows(out)
    assert sorted(r["uri"] for r in rows) == sorted(
        [f"s3://{s3_bucket}/images/{i}.jpg" for i in range(4)] + [f"s3://{s3_bucket}/images/broken.jpg"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="labels/run1/")["Contents"]}
    assert {"labels/run1/coco_results.json", "labels/run1/coco_dataset.json", "labels/run1/summary.json"} <= keys
    summary_text = s3.get_object(Bucket=s3_bucket, Key="labels/run1/summary.json")["Body"].read().decode()
    assert "testing" not in summary_text  # no credentials in outputs


def _job(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "jobs.batch_predict", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _pass_processes(session: int) -> list[int]:
    """Processes of ``session`` running a pass of the job (``python -m pipelines.passes``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == session and b"pipelines.passes" in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("passes", ["one pass", "a process per pass"])
def test_killed_driver_then_rerun_gives_every_image_once(tiny_model_dirs, test_images, tmp_path, passes):
    src = tmp_path / "in"
    good = _good_images(test_images, src, 80)
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--model-dir", str(tiny_model_dirs(MODEL)),
            "--batch-size", "1", "--rows-per-file", "2", "--ray-address", "local", "--num-cpus", "4"]
    if passes != "one pass":
        args += ["--shard-size", "20", "--shards-per-pass", "1"]  # 4 passes, each in its own process
    proc = _job(args)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "parts").glob("part-*.parquet")):
        time.sleep(0.02)
    if passes == "one pass":
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    else:
        assert _pass_processes(proc.pid), "a pass should be running in a process of its own"
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its pass process must not outlive it
        gone = time.time() + 15
        while _pass_processes(proc.pid) and time.time() < gone:
            time.sleep(0.2)
        assert not _pass_processes(proc.pid), "the pass process outlived the driver"
        os.killpg(proc.pid, signal.SIGKILL)  # the Ray it started
    proc.wait()
    # tasks already running when the driver died may still publish their parts: wait until quiet
    count, stable_since = -1, time.time()
    while time.time() - stable_since < 3:
        n = len(list((out / "parts").glob("part-*.parquet")))
        if n != count:
            count, stable_since = n, time.time()
        time.sleep(0.2)
    before = len(_rows(str(out)))
    assert 0 < before < len(good), "the job should have been killed mid-run"
    proc = _job(args)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    uris = [r["uri"] for r in _rows(str(out))]
    assert sorted(uris) == sorted(str(p) for p in good)  # union = input set, no duplicates
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_before_this_run"] == before and summary["images_this_run"] == len(good) - before


def _actor_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if "SegmentationActor" in cmd and "MapWorker" in cmd:
                pids.append(int(d.name))
    return pids


def test_killed_actor_is_restarted_and_every_image_written_once(ray_local, tiny_model_dirs, test_images, tmp_path):
    src = tmp_path / "in"
    good = _good_images(test_images, src, 24)
    out = tmp_path / "out"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and len(list((out / "parts").glob("part-*.parquet"))) < 2:
            time.sleep(0.1)
        for pid in _actor_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    s = run_batch_predict(BatchPredictConfig(input=str(src), output=str(out), model_dir=str(tiny_model_dirs(MODEL)),
                                             batch_size=1, rows_per_file=2, num_actors=1))
    t.join()
    assert killed, "no actor process was found to kill"
    uris = [r["uri"] for r in _rows(str(out))]
    assert sorted(uris) == sorted(str(p) for p in good)
    assert s["images_written"] == len(good)
