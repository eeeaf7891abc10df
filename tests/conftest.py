"""Shared fixtures of the test-suite; first of all, the CPU instruction-set pin (``tests/isa_pin.py``)."""
import os

import isa_pin

isa_pin.apply()  # first, before anything loads Paddle: every process of the run inherits it

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_IMAGES = SHARED / "data" / "coco_tiny_val2017" / "val2017"
SAMPLES = REPO / "samples"


# Set by .ci/run: a tool the suite installs itself (the PaddleX venv, moto_server) being absent is
# a broken set-up, so its tests fail instead of skipping unnoticed.
REQUIRE_TOOLS_ENV = "INSTSEG_REQUIRE_TOOLS"


def missing_tool(message: str) -> None:
    """Skip the test for a missing tool, or fail it when the run requires every tool (CI)."""
    if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_TOOLS_ENV}=1: required in this run)", pytrace=False)
    pytest.skip(message)


def _paddlex_python() -> str | None:
    cand = os.environ.get("INSTSEG_PADDLEX_PYTHON") or str(REPO / ".venv-paddlex" / "bin" / "python")
    return cand if Path(cand).exists() else None


@pytest.fixture(scope="session")
def paddlex_python() -> str:
    """Interpreter of the PaddleX 3.7.2 venv (`make test` builds it); tests needing it skip otherwise."""
    py = _paddlex_python()
    if py is None:
        missing_tool("PaddleX 3.7.2 venv not found (run `make test`, or set INSTSEG_PADDLEX_PYTHON)")
    return py


def run_paddlex(paddlex_python: str, requests: list[dict], tmp: Path) -> None:
    """Run tests/paddlex_runner.py in the PaddleX venv on a list of requests."""
    import json

    req_file = tmp / "paddlex_requests.json"
    req_file.write_text(json.dumps(requests))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PADDLE_PDX_CACHE_HOME"] = str(tmp / "paddlex_home")  # never touch the user's ~/.paddlex
    proc = subprocess.run([paddlex_python, str(REPO / "tests" / "paddlex_runner.py"), str(req_file)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"PaddleX runner failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


@pytest.fixture(scope="session")
def test_images(tmp_path_factory) -> list[str]:
    """A few real photos (COCO val2017 from ../shared when present) plus the bundled samples."""
    photos = sorted(COCO_IMAGES.glob("*.jpg"))[:3] if COCO_IMAGES.is_dir() else []
    return [str(p) for p in photos] + [str(p) for p in sorted(SAMPLES.glob("*.jpg"))]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Exported tiny models, one per name asked for, cached for the session."""
    from tiny_models import export_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = export_tiny_model(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto_server, as s3fs's own tests use) on loopback.

    Yields its endpoint URL; the standard AWS variables point boto3/s3fs/pyarrow at it for the
    session (dummy credentials, never real ones).
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        missing_tool("moto_server not installed (pip install 'moto[server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One private local Ray for the whole session (``address="local"`` never joins a ``ray start``
    head); the loopback S3 server's AWS_* variables are set first, so every worker inherits them.

    Its dashboard address is a port of its own that nothing serves. Without a dashboard Ray still
    records ``127.0.0.1:8265`` (the default port) as this cluster's state-API address, and Ray
    Train's placement-group cleaner asks that address every second whether the run's controller
    is alive: when another local Ray cluster (another test run on the machine) serves its
    dashboard on 8265, the answer is "no such actor", the cleaner removes the run's placement
    group and both workers die ("A worker health check failed ... Destroying worker since its
    placement group was removed"). The port is held (bound, never listening) for the session, so
    the queries are refused and the cleaner keeps waiting, as on a machine with one cluster. The
    workers get it as ``RAY_API_SERVER_ADDRESS`` too: without it the cleaner looks the cluster up
    machine-wide, and with several clusters running it picks the one a ``ray start`` recorded in
    ``/tmp/ray/ray_current_cluster`` (maybe another's) or gives up with a traceback.
    """
    import socket

    ray = pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=4, include_dashboard=False, dashboard_port=port, ignore_reinit_error=True,
             runtime_env={"env_vars": env})
    hold = socket.socket()
    try:
        hold.bind(("127.0.0.1", port))
    except OSError:  # taken between choosing and holding it: still not this cluster's, rarely a dashboard
        pass
    yield
    ray.shutdown()
    hold.close()
