"""The batch job on a real two-node Ray cluster on loopback: a head and a worker node started with
`ray start` (each in its own session, with its own model cache as separate machines would have),
the job submitted with `ray job submit`, images and the model on S3 (moto_server). Actors run on
both nodes and each node copies the model once; then the worker node is killed mid-job (every
process of it, raylet included, SIGKILL) and the job still ends with every image in exactly one
row."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO
from test_ray_job_submit import _free_ports, _ray_cli, _tail

N_IMAGES = 24


def _start(args: list[str], env: dict[str, str], sid_file: Path) -> None:
    """`ray start ...` in a new session (its id recorded) so the whole node can be killed."""
    proc = subprocess.run(["setsid", "--wait", "bash", "-c", 'echo $$ > "$0"; exec "$@"', str(sid_file),
                           _ray_cli(), "start", *args, "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"ray start failed:\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"


def _session_pids(sid_file: Path) -> list[int]:
    sid = int(sid_file.read_text().split()[0])
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _kill_session(sid_file: Path) -> int:
    pids = _session_pids(sid_file) if sid_file.exists() else []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


@pytest.fixture
def two_nodes(s3_server):
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) is needed to stop the nodes")
    tmp = Path(tempfile.mkdtemp(prefix="isn-", dir="/tmp"))  # short: Ray's socket paths
    gcs, dash, agent, client = _free_ports(4)
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    base.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="disabled", PATH=f"{Path(_ray_cli()).parent}:{base['PATH']}")
    head_env = dict(base, INSTSEG_HOME=str(tmp / "head_home"))
    # the worker's own Ray dir, as on another machine (a shared one lets its runtime-env agent
    # delete the job's working dir under the head's driver)
    worker_env = dict(base, INSTSEG_HOME=str(tmp / "worker_home"), RAY_TMPDIR=str(tmp / "w"))
    sids = {"head": tmp / "head.sid", "worker": tmp / "worker.sid"}
    try:
        # each node fits one actor (2 CPUs) plus light tasks; the head can take a second actor
        # once the worker is gone
        _start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "5",
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
                "--object-store-memory", str(400 * 2**20)], head_env, sids["head"])
        _start(["--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                "--object-store-memory", str(300 * 2**20)], worker_env, sids["worker"])
        yield {"env": head_env, "url": f"http://127.0.0.1:{dash}", "tmp": tmp, "sids": sids}
    finally:
        for sid in sids.values():
            _kill_session(sid)
        shutil.rmtree(tmp, ignore_errors=True)


def _upload(fs, local: Path, remote: str) -> None:
    for f in local.rglob("*"):
        if f.is_file():
            fs.put_file(str(f), f"{remote}/{f.relative_to(local).as_posix()}")


@pytest.mark.slow
def test_worker_node_killed_mid_job(two_nodes, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    photos = sorted((REPO / "samples" / "shapes").glob("*.jpg"))
    for i in range(N_IMAGES):
        s3.put_object(Bucket=s3_bucket, Key=f"images/img_{i:03d}.jpg", Body=photos[i % len(photos)].read_bytes())
    for f in (REPO / "samples" / "model").iterdir():
        if f.is_file():
            s3.upload_file(str(f), s3_bucket, f"models/demo/{f.name}")
    out = tmp_path / "out"
    job_id = f"multinode-{uuid.uuid4().hex[:8]}"
    cmd = [_ray_cli(), "job", "submit", "--address", two_nodes["url"], "--submission-id", job_id,
           "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", str(REPO), "--",
           "python", "-m", "jobs.batch_predict", "--input", f"s3://{s3_bucket}/images/", "--output", str(out),
           "--model-dir", f"s3://{s3_bucket}/models/demo", "--num-actors", "2", "--num-cpus-per-actor", "2",
           "--batch-size", "1", "--rows-per-file", "2", "--shard-size", "4", "--progress-interval-s", "2"]
    job = subprocess.Popen(cmd, cwd=REPO, env=two_nodes["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    worker_home = two_nodes["tmp"] / "worker_home" / "remote_models"
    deadline = time.monotonic() + 300
    killed = 0
    while time.monotonic() < deadline and job.poll() is None:
        parts = list((out / "parts").glob("part-*.parquet")) if (out / "parts").exists() else []
        if len(parts) >= 2 and worker_home.exists():  # the worker's actor is up and rows are flowing
            killed = _kill_session(two_nodes["sids"]["worker"])
            break
        time.sleep(0.5)
    assert killed, "the job ended (or stalled) before the worker node could be killed"
    try:
        logs, _ = job.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        job.kill()
        subprocess.run([_ray_cli(), "job", "stop", "--address", two_nodes["url"], job_id], env=two_nodes["env"],
                       capture_output=True, timeout=60)
        raise AssertionError("the job did not end within 10 min of the node loss")
    assert job.returncode == 0, _tail(logs, 8000)
    summary = json.loads((out / "summary.json").read_text())
    rows = [r for p in (out / "parts").glob("part-*.parquet") for r in pq.read_table(p).to_pylist()]
    assert summary["images_written"] == summary["images_total"] == N_IMAGES
    assert len(rows) == len({r["uri"] for r in rows}) == N_IMAGES and all(r["status"] == "ok" for r in rows)
    # the model was copied once per node, into that node's own cache
    head_home = two_nodes["tmp"] / "head_home" / "remote_models"
    assert len([d for d in head_home.iterdir() if d.is_dir() and not d.name.startswith(".")]) == 1
    assert len([d for d in worker_home.iterdir() if d.is_dir() and not d.name.startswith(".")]) == 1
