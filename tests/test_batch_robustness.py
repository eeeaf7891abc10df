"""The batch job never hangs and never loses an image to a predictor failure.

* :class:`pipelines.isolated.IsolatedPredictor` on its own, with a small handler of this module run
  in a real child process: a memory hog, a crash (SIGSEGV), a hang, each costs only its own row, the
  batch is split and retried, and a handler that cannot start is one clear error.
* The real job (``python -m jobs.batch_predict`` with its own local Ray) on the demo model, with a
  75 MP photo that needs more memory than the actors may use and an image that crashes the
  predictor process: both become error rows (``out_of_memory``, ``crashed``), every other image is
  ``ok``, the job exits 0 and summary.json counts the splits.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# -- a handler for the child process (module level: the child is spawned and imports it by name)
def make_test_handler(config: dict):
    if config.get("fail_to_start"):
        raise ValueError("no such model: /nowhere")

    def handle(items):
        rows = []
        for uri, data in items:
            if "hog" in uri:
                hog = np.ones(int(config["hog_bytes"]), dtype=np.uint8)  # touched: resident
                time.sleep(2.0)
                del hog
            if "boom" in uri:
                os.kill(os.getpid(), signal.SIGSEGV)
            if "hang" in uri:
                time.sleep(600)
            rows.append({"uri": uri, "status": "ok", "n": len(data)})
        return rows

    return handle


def _error_row(uri: str, kind: str, message: str) -> dict:
    return {"uri": uri, "status": "error", "kind": kind, "message": message}


def test_isolated_predictor_turns_failures_into_rows():
    from pipelines.isolated import IsolatedPredictor

    limit = 600 * 2**20
    pred = IsolatedPredictor(make_test_handler, {"hog_bytes": 2 * limit}, _error_row, memory_limit=limit,
                             timeout_s=8.0)
    try:
        items = [(name, b"x" * i) for i, name in enumerate(["a", "hog", "b", "boom", "c", "hang", "d", "e"])]
        t0 = time.monotonic()
        rows = pred(items)
        elapsed = time.monotonic() - t0
        assert [r["uri"] for r in rows] == [u for u, _ in items]  # one row per item, in order
        kinds = {r["uri"]: r.get("kind") for r in rows if r["status"] == "error"}
        assert kinds == {"hog": "out_of_memory", "boom": "crashed", "hang": "timeout"}
        assert "GiB" in rows[1]["message"] and "SIGSEGV" in rows[3]["message"]
        assert all(r["n"] == i for i, r in enumerate(rows) if r["status"] == "ok")
        assert pred.stats.batch_splits >= 3 and pred.stats.child_restarts >= 3
        assert elapsed < 180, elapsed  # bounded: no retry loop
        # the predictor is still usable afterwards
        assert pred([("f", b"")])[0]["status"] == "ok"
    finally:
        pred.close()


def test_isolated_predictor_that_cannot_start_is_one_clear_error():
    from pipelines.isolated import IsolatedPredictor

    with pytest.raises(RuntimeError, match="no such model: /nowhere"):
        IsolatedPredictor(make_test_handler, {"fail_to_start": True}, _error_row, memory_limit=None)


def test_job_survives_an_oom_image_and_a_crashing_image(tmp_path):
    import cv2

    src = tmp_path / "in"
    src.mkdir()
    shapes = sorted((REPO / "samples" / "shapes").glob("*.jpg"))
    for p in shapes:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "crash_me.jpg").write_bytes(shapes[0].read_bytes())
    # 75 MP (under max_pixels): decoding and preprocessing it alone need more than the actor's
    # 0.65 GiB (the demo model's predictor process uses ~0.48 GiB on the samples, ~0.8 at 8000x6000)
    big = cv2.resize(cv2.imread(str(shapes[0])), (10000, 7500), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(src / "huge.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 60])
    out = tmp_path / "out"
    env = dict(os.environ, INSTSEG_TEST_CRASH_ON="crash_me")
    proc = subprocess.run([sys.executable, "-m", "jobs.batch_predict", "--input", str(src), "--output", str(out),
                           "--model-dir", str(REPO / "samples" / "model"), "--batch-size", "2",
                           "--actor-memory-gb", "0.65", "--num-actors", "1", "--ray-address", "local",
                           "--num-cpus", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_written"] == summary["images_total"] == len(shapes) + 2
    assert summary["errors_by_kind"] == {"out_of_memory": 1, "crashed": 1}, summary
    assert summary["by_status"] == {"ok": len(shapes), "error": 2}
    # each failure costs a fresh predictor process; a batch holding a failing image among others is split
    assert summary["batch_splits"] >= 1 and summary["predictor_restarts"] >= 2
    assert summary["actor_memory_gb"] == 0.65 and summary["max_mask_side"] == 1333
    assert summary["threshold"] == 0.5
    assert "retrying it as" in log and "skipping" in log

    import pyarrow.parquet as pq

    rows = pq.read_table(out / "parts").to_pylist()
    by_name = {Path(r["uri"]).name: r for r in rows}
    assert len(rows) == len(by_name) == len(shapes) + 2  # each image exactly once
    assert by_name["huge.jpg"]["error_kind"] == "out_of_memory" and "huge.jpg" in by_name["huge.jpg"]["error"]
    assert by_name["crash_me.jpg"]["error_kind"] == "crashed"
    assert all(by_name[p.name]["status"] == "ok" and by_name[p.name]["num_instances"] > 0 for p in shapes)


def test_user_mistakes_are_one_line_before_ray_starts(tmp_path):
    """Each mistake: exit code 2, one ``error:`` line naming the setting, no traceback, no output
    written, and (but for the memory one, which needs the cluster's size) no Ray started."""
    shapes, model = str(REPO / "samples" / "shapes"), str(REPO / "samples" / "model")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image")
    (tmp_path / "empty.txt").write_text("# a manifest with only a comment\n")
    (tmp_path / "bad.yaml").write_text("batch_size: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    cases = [
        (["--config", str(tmp_path / "none.yaml")], "No such file"),
        (["--config", str(tmp_path / "bad.yaml")], "is not valid YAML"),
        (["--config", str(tmp_path / "list.yaml")], "must hold a mapping"),
        (["--input", str(tmp_path / "no_images")], "no image files"),
        (["--input", str(tmp_path / "nowhere")], "does not exist"),
        (["--input", str(tmp_path / "empty.txt")], "lists no URIs"),
        (["--threshold", "2"], "threshold"),
        (["--max-mask-side", "10"], "max_mask_side"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--model-dir", str(tmp_path / "nowhere")], "does not exist"),
        (["--model-dir", shapes], "incomplete"),
        (["--output", str(a_file)], "is a file"),
        (["--actor-memory-gb", "100000"], "more than the largest Ray node offers"),
    ]
    for extra, words in cases:
        args = {"--input": shapes, "--output": str(tmp_path / "o"), "--model-dir": model}
        flags = [a for k, v in args.items() if k not in extra for a in (k, v)]
        proc = subprocess.run([sys.executable, "-m", "jobs.batch_predict", *flags, *extra, "--ray-address", "local"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and f"error: " in proc.stderr and words in proc.stderr, proc.stderr[-2000:]
        if "--actor-memory-gb" not in extra:
            assert "Started a local Ray" not in proc.stderr, extra
        assert not (tmp_path / "o").exists()


def test_s3_without_credentials_is_one_line_before_ray_starts(tmp_path, s3_server):
    """No AWS credentials anywhere: one line naming the input or output and what to set (it used to
    be a 78-line botocore traceback after Ray had started)."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="nocreds")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    model = str(REPO / "samples" / "model")
    for inp, out, words in [("s3://nocreds/images/", str(tmp_path / "o"), "input: no AWS credentials for s3://nocreds"),
                            (str(REPO / "samples" / "shapes"), "s3://nocreds/out", "output: no AWS credentials")]:
        proc = subprocess.run([sys.executable, "-m", "jobs.batch_predict", "--input", inp, "--output", out,
                               "--model-dir", model, "--ray-address", "local"],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert words in proc.stderr and "AWS_ACCESS_KEY_ID" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr, proc.stderr[-3000:]


COCO_PHOTOS = REPO.parent / "shared" / "data" / "coco_tiny_val2017" / "val2017"


@pytest.mark.skipif(not COCO_PHOTOS.is_dir(), reason="../shared/data/coco_tiny_val2017 not available")
def test_readme_batch_command_on_80_coco_photos(tmp_path):
    """The README's batch command at batch 4 on real photos (this used to hang in an OOM-restart loop)."""
    n = len(list(COCO_PHOTOS.glob("*.jpg")))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "jobs.batch_predict", "--input", str(COCO_PHOTOS), "--output", str(out),
                           "--model-dir", str(REPO / "samples" / "model"), "--batch-size", "4", "--labelme",
                           "--ray-address", "local", "--num-cpus", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_written"] == summary["images_total"] == n == 80
    assert summary["by_status"] == {"ok": 80} and summary["predictor_restarts"] == 0
    assert summary["threshold"] == 0.5  # the effective one: the model's draw_threshold, not null
    assert "each actor reserves" in proc.stderr


def test_progress_is_time_based_with_an_eta(caplog):
    """Lines arrive every interval while nothing is written (start-up, a slow model), and carry an
    ETA once results flow (it used to log only when a part file arrived)."""
    import logging

    import pyarrow as pa

    from pipelines.batch_predict import Progress

    def part(n: int) -> pa.Table:
        return pa.table({"status": ["ok"] * (n - 1) + ["error"], "num_instances": [2] * n,
                         "batch_splits": [0] * n, "predictor_restarts": [0] * n})

    caplog.set_level(logging.INFO, logger="instseg")
    with Progress(total=100, already_done=20, interval_s=0.1) as progress:
        time.sleep(0.45)  # no output yet: the ticker still reports
        waiting = [r.getMessage() for r in caplog.records]
        assert len(waiting) >= 3 and all("0/80 images this run" in m and "loading the model" in m for m in waiting)
        caplog.clear()
        progress.update(part(20))
        time.sleep(0.25)
    lines = [r.getMessage() for r in caplog.records if "loading the model" not in r.getMessage()]  # a tick may race
    assert len(lines) >= 1 and all("20/80 images this run (25.0%)" in m for m in lines), lines
    assert all("1 errors" in m and "ETA " in m for m in lines), lines
    eta = progress.eta_s()
    assert eta is not None and eta > 0
    caplog.clear()
    time.sleep(0.3)
    assert not caplog.records  # the ticker stopped with the context
