"""End to end through `ray job submit`: a local head from cluster/local/start_head.sh, the job
uploaded with cluster/runtime_env.yaml, the real entry point, then the outputs and `ray job logs`.

The head gets its own RAY_TMPDIR and free ports, so it can run beside a cluster that another test
module (or another program on the machine) started with ray.init(), and it is stopped with
cluster/local/stop.sh, which stops only this head (never a machine-wide `ray stop`).
Also checks that every cluster/ YAML file parses.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"
MODEL = "MaskRCNN-ResNet50-FPN"


def _ray_cli() -> str:
    for cand in (REPO / ".venv" / "bin" / "ray", Path(sys.executable).parent / "ray"):
        if cand.exists():
            return str(cand)
    found = shutil.which("ray")
    if not found:
        pytest.skip("ray CLI not found")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on every interface (Ray's GCS and agents listen on all of them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def _head_env(tmp: Path) -> dict[str, str]:
    gcs, dash, agent, client = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=str(tmp), RAY_PORT=str(gcs), DASHBOARD_PORT=str(dash),
               DASHBOARD_AGENT_LISTEN_PORT=str(agent), RAY_CLIENT_SERVER_PORT=str(client), RAY_NUM_CPUS="4")
    return env


def _stop_head(env: dict[str, str], tmp: Path) -> list[int]:
    """stop.sh for the head of env (if one was recorded); returns the pids it left running."""
    if not (tmp / f"instseg-ray-head-{env['RAY_PORT']}.sid").exists():
        return []
    stop = subprocess.run([str(CLUSTER / "local" / "stop.sh"), "--grace-period", "3"], env=env,
                          capture_output=True, text=True, timeout=120)
    print(stop.stdout, stop.stderr)
    left = _processes_mentioning(str(tmp))
    for pid in left:  # do not leave them running; the caller fails
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return left


@pytest.fixture(scope="module")
def ray_head():
    """A head started by start_head.sh; yields (env for the CLI, dashboard URL, Ray temp root)."""
    pytest.importorskip("ray")
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) is needed to stop only this head")
    # short path: Ray's unix sockets live under it and must stay < 108 bytes
    tmp = Path(tempfile.mkdtemp(prefix="instseg-ray-", dir="/tmp"))
    env, left = _head_env(tmp), []
    try:
        for attempt in range(2):  # a free port can be taken between choosing and binding it
            if attempt:
                left += _stop_head(env, tmp)
                env = _head_env(tmp)
            proc = subprocess.run([str(CLUSTER / "local" / "start_head.sh"),
                                   "--object-store-memory", str(500 * 2**20)],
                                  env=env, capture_output=True, text=True, timeout=180)
            if proc.returncode == 0:
                break
        assert proc.returncode == 0, f"start_head.sh failed:\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
        url = f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
        assert f"RAY_API_SERVER_ADDRESS={url}" in proc.stdout
        assert "RAY_AUTH_MODE=token" in proc.stdout
        yield dict(env, RAY_AUTH_MODE="token"), url, tmp
    finally:
        left += _stop_head(env, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"stop.sh left processes of the head running: {left}"


def _processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains text (Linux /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if text in (d / "cmdline").read_bytes().decode(errors="replace") and \
                    (d / "stat").read_text().split(") ", 1)[1][:1] != "Z":
                pids.append(int(d.name))
        except (OSError, IndexError):
            continue
    return pids


def _submit(ray_head, submission_id: str, entrypoint: list[str], timeout: float) -> subprocess.CompletedProcess:
    env, url, _ = ray_head
    cmd = [_ray_cli(), "job", "submit", "--address", url, "--submission-id", submission_id,
           "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", str(REPO), "--", *entrypoint]
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run([_ray_cli(), "job", "stop", "--address", url, submission_id], env=env,
                       capture_output=True, timeout=60)
        raise


def _job(ray_head, *args: str) -> str:
    env, url, _ = ray_head
    proc = subprocess.run([_ray_cli(), "job", *args[:1], "--address", url, *args[1:]], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"ray job {' '.join(args)} failed:\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_job_submit_batch_predict(ray_head, tiny_model_dirs, test_images, tmp_path):
    _, _, ray_tmp = ray_head
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i, p in enumerate(test_images):
        shutil.copy(p, src / f"img_{i:02d}{Path(p).suffix}")
    (src / "not_an_image.jpg").write_text("this is not a jpeg")
    n_good = len(test_images)
    model_dir = tiny_model_dirs(MODEL)
    t0 = time.monotonic()

    # the job's `python` is the venv's (start_head.sh puts it first on the head's PATH), and the
    # uploaded working dir is importable
    probe = _submit(ray_head, f"probe-{uuid.uuid4().hex[:8]}",
                    ["python", "-c", "import sys, jobs.batch_predict; print('EXE=' + sys.executable)"], timeout=120)
    assert probe.returncode == 0, f"probe job failed:\n{_tail(probe.stdout)}\n{_tail(probe.stderr)}"
    t_probe = time.monotonic() - t0
    exe = next(line.split("=", 1)[1].strip() for line in probe.stdout.splitlines() if line.startswith("EXE="))
    assert Path(exe).parent.resolve() == Path(_ray_cli()).parent.resolve(), exe

    # --progress-interval-s 0: a "progress:" line per finished batch; with the default 10 s a run
    # this small can end before the first periodic line (the final line says "predicted:")
    job_id = f"instseg-test-{uuid.uuid4().hex[:8]}"
    proc = _submit(ray_head, job_id, ["python", "-m", "jobs.batch_predict", "--input", str(src), "--output", str(out),
                                      "--model-dir", str(model_dir), "--batch-size", "2",
                                      "--progress-interval-s", "0"], timeout=240)
    assert proc.returncode == 0, f"ray job submit failed:\n{_tail(proc.stdout, 8000)}\n{_tail(proc.stderr)}"
    assert f"Job '{job_id}' succeeded" in _job(ray_head, "status", job_id)  # submit exits 1 on failure too

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_total"] == n_good + 1
    assert summary["images_written"] == n_good + 1
    assert summary["by_status"] == {"ok": n_good, "error": 1}
    assert summary["errors_by_kind"] == {"corrupt": 1}
    parts = sorted((out / "parts").glob("*.parquet"))
    assert parts, "no Parquet parts written"
    assert sum(pq.read_metadata(p).num_rows for p in parts) == n_good + 1
    logs = _job(ray_head, "logs", job_id)
    assert f"progress: {n_good + 1}/{n_good + 1} images this run" in logs, _tail(logs)

    # the working dir shipped to the cluster is code only (excludes in cluster/runtime_env.yaml)
    pkgs = [p for p in (ray_tmp / "ray").glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert pkgs
    for pkg in pkgs:
        files = [f for f in pkg.rglob("*") if f.is_file()]
        assert sum(f.stat().st_size for f in files) < 20 * 2**20
        assert (pkg / "jobs" / "batch_predict.py").exists()
        assert not any(part in (".venv", ".venv-paddlex", ".git", ".cache") for f in files
                       for part in f.relative_to(pkg).parts)
    print(f"probe job {t_probe:.1f}s, probe + labelling job + checks {time.monotonic() - t0:.1f}s")


def test_cluster_yaml_files_parse():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.relative_to(CLUSTER).as_posix() for f in files} >= {
        "runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-batch-predict.yaml", "vm/aws-gpu.yaml"}
    docs = {f.relative_to(CLUSTER).as_posix(): yaml.safe_load(f.read_text()) for f in files}
    env = docs["runtime_env.yaml"]
    assert env["working_dir"] == "." and ".venv/" in env["excludes"] and ".git/" in env["excludes"]
    assert "pip" not in env and "conda" not in env
    rc = docs["kuberay/raycluster.yaml"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["authOptions"] == {"mode": "token"}
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert str(gpu["nvidia.com/gpu"]) == "1"
    job = docs["kuberay/rayjob-batch-predict.yaml"]
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["entrypoint"].startswith("python -m jobs.batch_predict ")
    assert "rayClusterSpec" in job["spec"]
    vm = docs["vm/aws-gpu.yaml"]
    assert vm["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert vm["head_node_type"] in vm["available_node_types"]
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert "\nFROM rayproject/ray:2.60.0-py311-gpu\n" in dockerfile
    assert "paddlepaddle-gpu" in dockerfile and "-c constraints.txt" in dockerfile


def test_rayjob_entrypoint_is_a_valid_job_command_line():
    """The RayJob's entrypoint parses with the job's own flags into a GPU configuration."""
    import shlex

    from jobs.batch_predict import build_parser, config_from_args

    entrypoint = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-batch-predict.yaml").read_text())["spec"]["entrypoint"]
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "jobs.batch_predict"]
    cfg = config_from_args(build_parser().parse_args(argv[3:]))
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.model_name == "Mask-RT-DETR-L" and cfg.device == "gpu"
    assert cfg.num_gpus_per_actor == 0.5 and cfg.num_actors == 8
