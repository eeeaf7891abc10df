"""Peak memory of a whole batch-labelling job for N and 5N images: it must not grow with N (streaming).

Each size runs as its own ``python -m jobs.batch_predict ... --ray-address local`` subprocess (a
fresh local Ray each, nothing shared). A sampler thread walks /proc every 0.2 s and sums the memory
of the job's whole process tree: the driver, Ray's own processes it starts (GCS, raylet, ...) and
every Ray worker (``ray::...``: the actor, read/write tasks), children of the raylet. Only this
tree is counted, so other Ray instances on the machine do not leak in.

Printed per size: peak RSS sum (what ``ps`` shows; counts pages shared between processes - Paddle's
libraries, the object store's shared memory - once per process that maps them), peak PSS sum
(proportional set size from /proc/PID/smaps_rollup: shared pages split between the sharers, so the
sum is the tree's real footprint), the driver's and the ``ray::`` workers' share at the RSS peak, and
the ratio of the 5N peak to the N peak (target: <= 1.2, i.e. no growth with N).

    python bench/pipeline_memory.py [--images N] [--factor 5] [--interval 0.2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "MaskRCNN-ResNet50-FPN"
PAGE = os.sysconf("SC_PAGE_SIZE")


def image_pool() -> list[Path]:
    coco = REPO.parent / "shared" / "data" / "coco_tiny_val2017" / "val2017"
    pool = sorted(coco.glob("*.jpg")) if coco.is_dir() else []
    return pool or sorted((REPO / "samples").glob("*.jpg"))


def make_input_dir(folder: Path, n: int) -> None:
    """``n`` distinct file names (the pipeline keys images by URI) linking to the pool, repeated."""
    pool = image_pool()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img_{i:05d}{pool[i % len(pool)].suffix}").symlink_to(pool[i % len(pool)])


# ---------------------------------------------------------------- /proc sampling

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # comm may hold spaces: split after ')'
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _name(pid: int) -> str:
    """``ray::<what it runs>`` for Ray workers, else the program's base name."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(".__init__")[0][:60]
    prog = os.path.basename(first.split()[0]) if first else "?"
    if prog.startswith("python") and len(argv) > 1:  # name Ray's Python daemons by their script
        script = next((a.decode(errors="replace") for a in argv[1:] if a.endswith(b".py") or a == b"-m"), "")
        prog += " " + os.path.basename(script)
    return prog


class Sampler(threading.Thread):
    """Peak RSS sum (every ``interval`` s) and peak PSS sum (every ``pss_interval`` s: reading
    smaps_rollup of Ray's large address spaces costs ~6 ms a process) of a process tree."""

    def __init__(self, root: int, interval: float, pss_interval: float):
        super().__init__(daemon=True)
        self.root, self.interval, self.pss_interval = root, interval, pss_interval
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.at_peak = {"driver": 0, "workers": 0, "other": 0}
        self.procs_at_peak: list[tuple[int, str]] = []
        self.max_processes = self.samples = 0

    def run(self) -> None:
        next_pss = 0.0
        while not self.stop.is_set():
            rss = pss = 0
            parts = {"driver": 0, "workers": 0, "other": 0}
            procs = []
            pids = _tree(self.root)
            want_pss = time.monotonic() >= next_pss
            for pid in pids:
                try:
                    r = _rss(pid)
                    pss += _pss(pid) if want_pss else 0
                    name = _name(pid)
                except (OSError, ValueError):  # exited meanwhile
                    continue
                rss += r
                key = "driver" if pid == self.root else "workers" if name.startswith("ray::") else "other"
                parts[key] += r
                procs.append((r, "driver" if pid == self.root else name))
            if want_pss:
                next_pss = time.monotonic() + self.pss_interval
                self.peak_pss = max(self.peak_pss, pss)
            self.samples += 1
            self.max_processes = max(self.max_processes, len(pids))
            if rss > self.peak_rss:
                self.peak_rss, self.at_peak, self.procs_at_peak = rss, parts, sorted(procs, reverse=True)
            self.stop.wait(self.interval)


def run_job(src: Path, out: Path, model_dir: Path, args) -> dict:
    cmd = [sys.executable, "-m", "jobs.batch_predict", "--input", str(src), "--output", str(out),
           "--model-dir", str(model_dir), "--ray-address", "local", "--num-cpus", str(args.num_cpus),
           "--progress-interval-s", "5"]
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    t0 = time.monotonic()
    log = open(out.parent / f"{out.name}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid, args.interval, args.pss_interval)
    sampler.start()
    rc = proc.wait(timeout=args.timeout)
    sampler.stop.set()
    sampler.join()
    log.close()
    if rc != 0:
        tail = (out.parent / f"{out.name}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"job for {src} failed (exit {rc}):\n{tail}")
    return {"rss": sampler.peak_rss, "pss": sampler.peak_pss, "at_peak": sampler.at_peak,
            "procs": sampler.procs_at_peak, "max_processes": sampler.max_processes, "samples": sampler.samples,
            "wall": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40, help="N; the second job gets factor * N")
    ap.add_argument("--factor", type=int, default=5)
    ap.add_argument("--interval", type=float, default=0.2, help="sampling period, seconds")
    ap.add_argument("--pss-interval", type=float, default=1.0, help="PSS sampling period, seconds")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of each job's local Ray")
    ap.add_argument("--timeout", type=float, default=240, help="per job, seconds")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "tests"))  # the tiny stand-in models are test scaffolding
    from tiny_models import export_tiny_model

    mib = 1 << 20
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = export_tiny_model(MODEL, tmp / "model")
        sizes = [args.images, args.images * args.factor]
        print(f"{MODEL} (tiny export), jobs.batch_predict defaults (1 actor, batch 4, rows_per_file 1000), "
              f"local Ray with {args.num_cpus} logical CPUs on {os.cpu_count()} cores; images repeated from "
              f"{len(image_pool())} photos; process-tree RSS sampled every {args.interval} s, PSS every "
              f"{args.pss_interval} s")
        print(f"{'images':>6s} {'peak RSS MiB':>12s} {'peak PSS MiB':>12s} {'driver':>7s} {'ray::':>7s} {'actor':>7s} "
              f"{'other':>7s} {'procs':>5s} {'samples':>7s} {'wall s':>7s}", flush=True)
        res = {}
        for n in sizes:
            src = tmp / f"in_{n}"
            make_input_dir(src, n)
            r = res[n] = run_job(src, tmp / f"out_{n}", model_dir, args)
            a = r["at_peak"]
            actor = max((rss for rss, name in r["procs"] if name.startswith("ray::MapWorker")), default=0)
            print(f"{n:6d} {r['rss'] / mib:12.0f} {r['pss'] / mib:12.0f} {a['driver'] / mib:7.0f} "
                  f"{a['workers'] / mib:7.0f} {actor / mib:7.0f} {a['other'] / mib:7.0f} {r['max_processes']:5d} "
                  f"{r['samples']:7d} {r['wall']:7.1f}", flush=True)
    small, big = res[sizes[0]], res[sizes[1]]
    ratio_rss, ratio_pss = big["rss"] / small["rss"], big["pss"] / small["pss"]
    print("(driver / ray:: / actor / other: RSS at the moment of the RSS peak; actor = the SegmentationActor's "
          "process, part of ray::)")
    print(f"largest processes at the RSS peak of the {sizes[1]}-image job (RSS MiB):")
    for r, name in big["procs"][:8]:
        print(f"  {r / mib:7.0f}  {name}")
    print(f"peak RSS: {small['rss'] / mib:.0f} MiB for {sizes[0]} images, {big['rss'] / mib:.0f} MiB for {sizes[1]}: "
          f"ratio {ratio_rss:.2f}")
    print(f"peak PSS: {small['pss'] / mib:.0f} MiB for {sizes[0]} images, {big['pss'] / mib:.0f} MiB for {sizes[1]}: "
          f"ratio {ratio_pss:.2f}")
    print(f"target: ratio <= 1.20 (memory does not grow with the number of images): "
          f"{'met' if max(ratio_rss, ratio_pss) <= 1.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
