"""The Serve endpoint under bounded local load vs the predictor called directly, in one run.

* direct: in this process, for each request's photo: ``decode_image_bytes`` -> ``predict_arrays``
  -> the response's ``result`` (``build_result``: cropped-mask RLE): the work a replica does per
  image, minus HTTP, JSON and Serve. Run with 1 and with ``--threads`` Paddle threads (default: the
  usable cores, the predictor's default), in batches of 1 and of ``--max-batch-size``, before and
  after the endpoint runs; the reference is the best of these configurations (mean of its before
  and after), so the ratio is against the fastest way to run the predictor in one process.
* endpoint: ``serve.run`` of ``pipelines.serve:app`` on a fresh local Ray, ``--replicas`` replicas
  (default: one per usable core) of ``--replica-threads`` Paddle threads (default 1); C clients
  (asyncio + aiohttp, in this process) send ``--requests`` POSTs (base64 photos, ``visualize:
  false``; bodies built before timing), each client one request at a time. Reported: requests/s,
  p50/p99 latency, the batch sizes the replicas ran, CPU ms per request by process (client,
  proxy, replicas, other Ray), and the ratio requests/s / direct images/s.

Everything shares the machine's CPUs (client, Serve proxy, replicas): the ratio is what an operator
gets from one box. Model: the demo PP-YOLOE_seg (``samples/model``). Photos: the 80 COCO val2017
photos when present, else ``samples/``.

    python bench/serve.py [--requests 200] [--clients 1,4,16] [--replicas R] [--replica-threads T]
        [--threads T] [--max-batch-size 8] [--batch-wait-s 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, image_pool  # noqa: E402


def direct_rate(model, photos: list[bytes], n: int, batch: int) -> float:
    """Images/s of decode -> predict_arrays -> build_result for ``n`` requests, ``batch`` at a time."""
    from instseg_core.inputs import decode_image_bytes
    from pipelines.serve_protocol import build_result

    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        images = [decode_image_bytes(photos[i % len(photos)], "photo") for i in range(start, min(n, start + batch))]
        for image, inst in zip(images, model.predict_arrays(images)):
            build_result(inst, model.labels, image, visualize=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f" batch {batch}: {n / wall:.2f} img/s, {cpu / n * 1000:.1f} CPU ms per image")
    return n / wall


async def load(port: int, bodies: list[bytes], n: int, clients: int) -> tuple[float, list[float], list[int]]:
    """``n`` POSTs from ``clients`` concurrent clients; wall time, latencies (s), statuses."""
    import aiohttp

    latencies: list[float] = []
    statuses: list[int] = []
    next_index = iter(range(n))
    url = f"http://127.0.0.1:{port}/instance-segmentation"

    async def client(session: aiohttp.ClientSession) -> None:
        for i in next_index:  # shared iterator: each request is sent once
            t = time.perf_counter()
            async with session.post(url, data=bodies[i % len(bodies)],
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                statuses.append(resp.status)
            latencies.append(time.perf_counter() - t)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return wall, latencies, statuses


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and its process tree, by role."""
    import psutil

    roles = {"client (this process)": psutil.Process()}
    totals: dict[str, float] = {}
    for proc in [roles["client (this process)"], *roles["client (this process)"].children(recursive=True)]:
        try:
            cmd = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        if proc is roles["client (this process)"]:
            role = "client (this process)"
        elif "ServeReplica" in cmd:
            role = "replica"
        elif "ProxyActor" in cmd:
            role = "proxy"
        else:
            role = "other Ray"
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def batch_sizes(handle, replicas: int) -> dict[str, list[int]]:
    """Each replica's recent batch sizes (a handle call reaches one replica: ask until all answered)."""
    found: dict[str, list[int]] = {}
    for _ in range(50 * replicas):
        got = handle.recent_batch_sizes.remote().result()
        found[got["replica"]] = got["sizes"]
        if len(found) == replicas:
            break
    return found


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="Paddle threads of the direct loop, tried besides 1 (default: usable cores)")
    ap.add_argument("--replicas", type=int, default=len(os.sched_getaffinity(0)),
                    help="replicas of the endpoint (default: usable cores, one Paddle thread each)")
    ap.add_argument("--replica-threads", type=int, default=1, help="Paddle threads of each replica")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-s", type=float, default=0.01)
    ap.add_argument("--model-dir", default=str(REPO / "samples" / "model"))
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    logging.basicConfig(level=logging.WARNING)
    photos = [p.read_bytes() for p in image_pool()]
    bodies = [json.dumps({"image": base64.b64encode(b).decode(), "visualize": False}).encode() for b in photos]
    print(f"{len(photos)} photos, {args.requests} requests per level, clients {levels}; direct: 1 process, "
          f"{sorted({1, args.threads})} Paddle threads; endpoint: {args.replicas} replica(s) x {args.replica_threads} thread(s), "
          f"max_batch_size {args.max_batch_size}, wait {args.batch_wait_s}s; "
          f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}")

    from instseg_core import create_model

    models = {t: create_model(model_dir=args.model_dir, device="cpu", cpu_threads=t) for t in sorted({1, args.threads})}
    configs = [(t, b) for t in models for b in sorted({1, args.max_batch_size})]

    def direct_all(label: str) -> dict[tuple[int, int], float]:
        rates = {}
        for t, b in configs:
            print(f"  {label}, {t} thread(s):", end="")
            rates[(t, b)] = direct_rate(models[t], photos, args.requests, b)
        return rates

    for t, m in models.items():
        print(f"  warm-up, {t} thread(s):", end="")
        direct_rate(m, photos, 16, 1)
    before = direct_all("before")

    import ray
    from ray import serve

    from pipelines.serve import APP_NAME, DEPLOYMENT_NAME, app

    ray.init(address="local", num_cpus=max(2, args.threads, args.replicas), include_dashboard=False,
             log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"model_dir": args.model_dir, "max_batch_size": args.max_batch_size,
                   "batch_wait_timeout_s": args.batch_wait_s, "max_ongoing_requests": 2 * max(levels),
                   "cpu_threads": args.replica_threads, "num_replicas": args.replicas,
                   "ray_actor_options": {"num_cpus": 1}}),
              name=APP_NAME, route_prefix="/")
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    results = []
    try:
        asyncio.run(load(port, bodies, 16, 4))  # warm-up: connections, first batches
        for clients in levels:
            seen = batch_sizes(handle, args.replicas)
            cpu0 = cpu_seconds()
            wall, latencies, statuses = asyncio.run(load(port, bodies, args.requests, clients))
            cpu1 = cpu_seconds()
            now = batch_sizes(handle, args.replicas)
            sizes = [b for rid, got in now.items() for b in got[len(seen.get(rid, [])):]]
            cpu_ms = {k: (cpu1[k] - cpu0.get(k, 0.0)) / args.requests * 1000 for k in cpu1}
            print(f"{clients} clients: CPU ms per request: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu_ms.items())))
            bad = [s for s in statuses if s != 200]
            if bad:
                raise SystemExit(f"{len(bad)} requests failed at {clients} clients: statuses {sorted(set(bad))}")
            results.append((clients, args.requests / wall, _pct(latencies, 0.5), _pct(latencies, 0.99),
                            statistics.mean(sizes), max(sizes)))
    finally:
        serve.shutdown()
        ray.shutdown()

    after = direct_all("after")
    mean = {c: (before[c] + after[c]) / 2 for c in configs}
    top = max(mean, key=mean.get)
    best = mean[top]
    print(f"direct reference: {best:.2f} img/s ({top[0]} thread(s), batch {top[1]}; mean of before/after)")
    print("| clients | requests/s | p50 ms | p99 ms | mean batch | max batch | endpoint / direct |")
    print("|---|---|---|---|---|---|---|")
    for clients, rps, p50, p99, mean_batch, max_batch in results:
        print(f"| {clients} | {rps:.2f} | {p50 * 1000:.0f} | {p99 * 1000:.0f} | {mean_batch:.2f} | {max_batch} | "
              f"{rps / best:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
