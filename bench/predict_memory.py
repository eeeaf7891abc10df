"""Peak memory and time of one predict call per (model dir, photo size, max_mask_side), each in a
fresh subprocess (2 Paddle threads), so one run's allocations never hide another's.

The photo is a COCO val2017 image (or a bundled sample), upscaled to each size. Printed per row: the
subprocess's peak RSS (``ru_maxrss``), the predict time (second call, after a warm-up call at the
same size; first call with ``--no-warmup``) and the number of instances kept; then, for the first
two model dirs (or, with ``--pairs``, each (before, after) pair of dirs), the ratio after/before at each
size. With ``--pairs`` the "before" dirs run with ``--before-max-mask-side`` (default none: the old
predictor's behaviour) and the "after" dirs with ``--max-mask-side``.
A subprocess that exceeds ``--limit-gb`` (RLIMIT_AS is useless with Paddle's reservations, so a
watchdog kills it) prints ``killed``.

    .venv/bin/python bench/predict_memory.py DIR [DIR ...] [--sizes 640x480,4000x3000,8000x6000]
        [--max-mask-side 1333 | none] [--paddlex]   # --paddlex: also PaddleX 3.7.2 (INSTSEG_PADDLEX_PYTHON)
    .venv/bin/python bench/predict_memory.py --pairs OLD1 NEW1 OLD2 NEW2 ... [--sizes ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, image_pool

CHILD = r"""
import json, resource, sys, time
import cv2, numpy as np
model_dir, w, h, side, warm, paddlex = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1", sys.argv[6] == "1"
img = cv2.resize(cv2.imread(sys.argv[7]), (w, h), interpolation=cv2.INTER_LINEAR)
if paddlex:
    from paddlex import create_model
    import yaml
    name = yaml.safe_load(open(model_dir + "/inference.yml"))["Global"]["model_name"]
    model = create_model(model_name=name, model_dir=model_dir, device="cpu")
    run = lambda: len(next(iter(model.predict(img)))["boxes"])
else:
    sys.path.insert(0, sys.argv[8])
    from instseg_core import create_model
    model = create_model(model_dir=model_dir, device="cpu", cpu_threads=2,
                         max_mask_side=None if side == "none" else int(side))
    run = lambda: len(model.predict_arrays([img])[0])
if warm:
    run()
t = time.perf_counter(); n = run(); dt = time.perf_counter() - t
# VmHWM, not ru_maxrss: the latter starts from the forking parent's peak
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rss_gb": hwm / 2**20, "s": dt, "n": n}))
"""


def _peak_tree_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_one(python: str, model_dir: str, size: tuple[int, int], side: str, warm: bool, paddlex: bool,
            photo: Path, limit_gb: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", FLAGS_logtostderr="0", GLOG_minloglevel="3")
    cmd = [python, "-c", CHILD, model_dir, str(size[0]), str(size[1]), side, "1" if warm else "0",
           "1" if paddlex else "0", str(photo), str(REPO)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    while proc.poll() is None:
        if _peak_tree_rss(proc.pid) > limit_gb * 2**30:
            proc.kill()
            proc.wait()
            return {"killed": True}
        time.sleep(0.1)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        return {"failed": proc.returncode}
    return json.loads(out[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+")
    p.add_argument("--sizes", default="640x480,4000x3000")
    p.add_argument("--max-mask-side", default="1333")
    p.add_argument("--pairs", action="store_true", help="dirs are (before, after) pairs")
    p.add_argument("--before-max-mask-side", default="none")
    p.add_argument("--paddlex", action="store_true", help="also run PaddleX 3.7.2 on each dir")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--limit-gb", type=float, default=20.0)
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    photo = image_pool()[0]
    runners = [("instseg", sys.executable, False)]
    if args.paddlex:
        pdx = os.environ.get("INSTSEG_PADDLEX_PYTHON") or str(REPO / ".venv-paddlex" / "bin" / "python")
        runners.append(("paddlex", pdx, True))
    print(f"photo {photo.name}; max_mask_side {args.max_mask_side}"
          + (f" (before dirs: {args.before_max_mask_side})" if args.pairs else "")
          + f"; one subprocess per row; killed above {args.limit_gb} GB")
    print(f"{'model dir':44s} {'runner':8s} {'side':>5s} {'size':>10s} {'peak RSS GB':>12s} {'s/image':>8s} {'kept':>5s}")
    table: dict = {}
    for k, d in enumerate(args.dirs):
        side = args.before_max_mask_side if args.pairs and k % 2 == 0 else args.max_mask_side
        for name, python, pdx in runners:
            for size in sizes:
                r = run_one(python, d, size, side, not args.no_warmup, pdx, photo, args.limit_gb)
                table[(d, name, size)] = r
                head = f"{d[-44:]:44s} {name:8s} {side:>5s} {size[0]:>5d}x{size[1]:<5d}"
                if "rss_gb" in r:
                    print(f"{head} {r['rss_gb']:12.2f} {r['s']:8.2f} {r['n']:5d}", flush=True)
                else:
                    print(f"{head} {'killed' if r.get('killed') else 'failed':>12s}", flush=True)
    pairs = list(zip(args.dirs[::2], args.dirs[1::2])) if args.pairs else [tuple(args.dirs[:2])] * (len(args.dirs) >= 2)
    for a, b in pairs:
        for size in sizes:
            ra, rb = table[(a, "instseg", size)], table[(b, "instseg", size)]
            if "rss_gb" in ra and "rss_gb" in rb:
                print(f"{size[0]}x{size[1]}: {b[-40:]} / {a[-40:]}: peak RSS x{rb['rss_gb'] / ra['rss_gb']:.2f}, "
                      f"time x{rb['s'] / ra['s']:.2f} (speed-up {ra['s'] / rb['s']:.1f}x)")
            elif "rss_gb" in rb:
                print(f"{size[0]}x{size[1]}: {b[-40:]}: {rb['rss_gb']:.2f} GB; before: "
                      f"{'killed above the limit' if ra.get('killed') else 'failed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
