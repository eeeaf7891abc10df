"""Driver memory and time of the batch job as the input grows: does anything on the driver grow
with the number of images?

For each N, a text manifest of N URIs of missing files (each becomes a cheap ``not_found`` row
that still passes every stage: shards, expand, read, actor, parts, finish, COCO merge) plus the
sample photos, run as ``python -m jobs.batch_predict --num-actors 1`` in its own process, joined
to a ``ray start --head`` (4 CPUs) of the bench's own. A sampler reads the driver's VmHWM (peak RSS)
and VmRSS from /proc every 0.2 s, another the object store's usage (``ray memory --stats-only``'s
numbers) every 2 s.
Printed per N: rows written, wall time, the time from the last prediction to the end (finish + COCO
merge + summary), driver peak RSS, the ratio of peak RSS to the smallest N's, and the driver's
largest RSS within each pass (one Ray Dataset execution of ``--shards-per-pass`` shards).

    .venv/bin/python bench/scale_driver.py [--sizes 100000,1000000] [--shards-per-pass 100]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from _common import REPO


def _status_kb(pid: int, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(field + r":\s+(\d+) kB", text)
    return int(m.group(1)) if m else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayHead:
    """A ``ray start --head`` of its own (new session, own temp dir) that the job joins, so the
    bench can ask it for the object store's usage; stopped by killing its session."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="disabled")
        self.env = env
        ray_cli = str(Path(sys.executable).parent / "ray")
        self.proc = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                      "--port", str(self.port), "--num-cpus", "4", "--include-dashboard", "false",
                                      "--disable-usage-stats"], env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.address = f"127.0.0.1:{self.port}"
        self.peak_mib = 0
        self._stop = threading.Event()
        deadline = time.time() + 60
        while self.usage_mib() is None:
            if time.time() > deadline:
                raise RuntimeError("the Ray head did not start")
            time.sleep(1)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def usage_mib(self) -> int | None:
        from ray._private import internal_api

        try:
            text = internal_api.memory_summary(address=self.address, stats_only=True)
        except Exception:  # noqa: BLE001 - not up yet
            return None
        m = re.search(r"Plasma memory usage (\d+) MiB", text)
        return int(m.group(1)) if m else None

    def _sample(self) -> None:
        while not self._stop.wait(2.0):
            self.peak_mib = max(self.peak_mib, self.usage_mib() or 0)

    def stop(self) -> None:
        self._stop.set()
        sid = os.getsid(self.proc.pid)
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.getsid(int(d.name)) == sid:
                        os.kill(int(d.name), signal.SIGKILL)
                except OSError:
                    continue


def _stamp(line: str) -> float | None:
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def run(n: int, tmp: Path, timeout: float, shards_per_pass: int | None) -> dict:
    manifest = tmp / f"manifest_{n}.txt"
    photos = sorted((REPO / "samples" / "shapes").glob("*.jpg"))
    with manifest.open("w") as f:
        for i in range(n):
            f.write(f"/nonexistent/bench/img_{i:09d}.jpg\n")
        for p in photos:
            f.write(f"{p}\n")
    out = tmp / f"out_{n}"
    head = RayHead(Path(tempfile.mkdtemp(prefix="bsd-", dir="/tmp")))  # short: Ray's socket paths
    cmd = [sys.executable, "-m", "jobs.batch_predict", "--input", str(manifest), "--output", str(out),
           "--model-dir", str(REPO / "samples" / "model"), "--num-actors", "1", "--ray-address", head.address,
           "--progress-interval-s", "30"]
    if shards_per_pass:
        cmd += ["--shards-per-pass", str(shards_per_pass)]
    t0 = time.time()
    log = tmp / f"log_{n}.txt"
    with log.open("w") as lf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=lf, text=True)
        peak, samples = 0, []
        while proc.poll() is None and time.time() - t0 < timeout:
            peak = max(peak, _status_kb(proc.pid, "VmHWM") or 0)
            samples.append((time.time(), _status_kb(proc.pid, "VmRSS") or 0))
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        stdout = proc.communicate()[0]
    wall = time.time() - t0
    head.stop()
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    lines = log.read_text().splitlines()
    predicted = next((_stamp(x) for x in lines if "instseg: predicted:" in x), None)
    finished = next((_stamp(x) for x in lines if "instseg: run " in x and " finished:" in x), None)
    # the driver's largest RSS during each pass (one Ray Dataset execution): flat if nothing
    # carries over from pass to pass
    starts = [_stamp(x) for x in lines if re.search(r"instseg: pass \d+/\d+", x)] or [t0]
    bounds = starts + [predicted or time.time()]
    per_pass = [max((r for t, r in samples if a <= t < b), default=0) / 1024 for a, b in zip(bounds, bounds[1:])]
    return {"n": n, "rows": summary.get("images_written"), "rc": proc.returncode, "wall_s": wall,
            "merge_s": (finished - predicted) if predicted and finished else None, "peak_rss_mb": peak / 1024,
            "shards": summary.get("shards"), "per_pass_mb": per_pass, "object_store_mib": head.peak_mib, "tail": stdout[-300:] if not summary else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--shards-per-pass", type=int, default=None, help="the job's --shards-per-pass (default: its own)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'URIs':>9s} {'rows':>9s} {'shards':>6s} {'wall s':>7s} {'merge s':>7s} {'driver peak RSS MB':>18s} "
          f"{'vs first':>8s} {'object store peak MiB':>21s}")
    base = None
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for n in sizes:
            r = run(n, Path(tmp), args.timeout, args.shards_per_pass)
            base = base or r["peak_rss_mb"]
            merge = f"{r['merge_s']:7.1f}" if r["merge_s"] is not None else "      -"
            print(f"{n:>9d} {r['rows'] or 0:>9d} {r['shards'] or 0:>6d} {r['wall_s']:>7.1f} {merge} "
                  f"{r['peak_rss_mb']:>18.0f} {r['peak_rss_mb'] / base:>8.2f} {r['object_store_mib']:>21d}", flush=True)
            print(f"          driver RSS peak per pass (MB): {' '.join(f'{m:.0f}' for m in r['per_pass_mb'])}",
                  flush=True)
            if r["rc"] not in (0, 1):
                print(f"  job exit code {r['rc']}: {r['tail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
