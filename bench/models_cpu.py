"""The implemented models on CPU: parameters, ms/image vs PaddleX 3.7.2, and what batching buys.

(a) Parameters of ``build_model(name)`` counted as ``../shared/reference/ppdet_models.md`` §8 does
    (``state_dict`` numel without the BN ``_mean`` / ``_variance`` buffers), next to §8's numbers
    and to the same count over the official state-dict listing of ``../shared/oracles``.
(b) CPU ms/image at 640x640, batch 1: the predictor (``instseg_core.create_model``) on an export
    of each model (``instseg_core.export.export_model``, input 640, the oracle-rule weights of
    ``../shared/oracles`` so that detections are non-trivial; random init where an oracle is
    missing), and PaddleX 3.7.2's predictor on the same dir, images and threads, each in its own
    default run mode (oneDNN unless the model is on PaddleX's oneDNN blocklist; ours follows the
    same list). Both sides: read + decode + preprocess + graph + post-process + PaddleX-format
    masks. Ratio ours / PaddleX per model (< 1: ours faster), medians of alternating trials.
(c) Batching: ours at batch 1, 4 and 8 on the same images (images/s, ratio to batch 1) for
    PP-YOLOE_seg-S and Mask-RT-DETR-S, and PaddleX at batch 4 on the same dir (whether it batches,
    runs one image at a time, or fails).

PaddleX runs in its own venv (INSTSEG_PADDLEX_PYTHON, default .venv-paddlex/bin/python) through
``tests/paddlex_runner.py`` (``engine_config``: PaddleX 3.7.2 ignores a ``PaddlePredictorOption``),
ours in this process; model load and one warm-up batch are excluded on both sides. Exports are
cached in ``.cache/bench_models`` (``--export-dir``). The machine is shared: compare ratios.

    python bench/models_cpu.py [--models NAME ...] [--quick] [--threads T] [--images N]
                               [--trials K] [--no-paddlex] [--sections abc]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, image_pool  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))

MODELS = ["PP-YOLOE_seg-S", "Mask-RT-DETR-S", "Mask-RT-DETR-M", "Mask-RT-DETR-L", "Mask-RT-DETR-X",
          "Mask-RT-DETR-H"]
# (a) counts every model; (b) and (c) time the fixed-size 640x640 ones above
PARAM_MODELS = MODELS + ["SOLOv2", "MaskRCNN-ResNet50", "MaskRCNN-ResNet50-FPN", "MaskRCNN-ResNet50-vd-FPN",
                         "MaskRCNN-ResNet101-FPN", "MaskRCNN-ResNet101-vd-FPN", "MaskRCNN-ResNeXt101-vd-FPN",
                         "Cascade-MaskRCNN-ResNet50-FPN", "Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN"]
QUICK_MODELS = ["PP-YOLOE_seg-S", "Mask-RT-DETR-S", "Mask-RT-DETR-L"]
BATCH_MODELS = ["PP-YOLOE_seg-S", "Mask-RT-DETR-S"]
# ../shared/reference/ppdet_models.md §8, millions
REFERENCE_PARAMS_M = {"Mask-RT-DETR-S": 14.63, "Mask-RT-DETR-M": 18.78, "Mask-RT-DETR-L": 32.82,
                      "Mask-RT-DETR-X": 68.65, "Mask-RT-DETR-H": 129.81, "PP-YOLOE_seg-S": 9.00,
                      "SOLOv2": 46.59, "MaskRCNN-ResNet50": 35.96, "MaskRCNN-ResNet50-FPN": 44.40,
                      "MaskRCNN-ResNet50-vd-FPN": 44.42, "MaskRCNN-ResNet101-FPN": 63.39,
                      "MaskRCNN-ResNet101-vd-FPN": 63.41, "MaskRCNN-ResNeXt101-vd-FPN": 102.31,
                      "Cascade-MaskRCNN-ResNet50-FPN": 72.04, "Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN": 72.06}
# draw_threshold written to inference.yml (both predictors use it): the oracle-rule weights score
# low, so these keep a few detections per photo for the post-processing to work on
THRESHOLD = {"PP-YOLOE_seg-S": 0.02}
DEFAULT_THRESHOLD = 0.3
INPUT_SIZE = 640


# ------------------------------------------------------------------------------------ (a) params
def param_count(name: str) -> int:
    from instseg_core.modeling.build import build_model

    model = build_model(name)
    unique = {id(v): v for k, v in model.state_dict().items()  # SOLOv2 names 7 tensors twice
              if not (k.endswith("_mean") or k.endswith("_variance"))}
    n = sum(int(v.numel()) for v in unique.values())
    del model
    gc.collect()
    return n


def oracle_param_count(name: str) -> int | None:
    """The same count from the official state-dict listing (``../shared/oracles/<name>/state_dict.tsv``)."""
    tsv = REPO.parent / "shared" / "oracles" / name / "state_dict.tsv"
    if not tsv.exists():
        return None
    meta = tsv.with_name("meta.json")
    aliases = {pair[1] for pair in json.loads(meta.read_text()).get("aliases", [])} if meta.exists() else set()
    n = 0
    for line in tsv.read_text().splitlines()[1:]:
        key, shape = line.split("\t")[:2]
        if not (key.endswith("_mean") or key.endswith("_variance") or key in aliases):
            size = 1
            for v in shape.split(","):
                size *= int(v) if v else 1
            n += size
    return n


# ------------------------------------------------------------------------------------ exports
def export_dir(name: str, root: Path) -> Path:
    """An export of ``name`` at 640 with the oracle-rule weights, reused when already there."""
    d = root / f"{name}_{INPUT_SIZE}"
    if (d / "inference.yml").exists() and (d / "inference.pdiparams").exists():
        return d
    from oracle_utils import oracle_available, oracle_model

    from instseg_core.export import export_model
    from instseg_core.modeling.build import build_model

    if oracle_available(name, ("state_dict.tsv",)):
        model = oracle_model(name)
    else:
        print(f"  ({name}: no oracle weights, exporting the random init)", flush=True)
        model = build_model(name)
        model.eval()
    t0 = time.perf_counter()
    export_model(model, None, d, input_size=INPUT_SIZE, draw_threshold=THRESHOLD.get(name, DEFAULT_THRESHOLD))
    print(f"  exported {name} in {time.perf_counter() - t0:.0f} s -> {d}", flush=True)
    del model
    gc.collect()
    return d


# ------------------------------------------------------------------------------------ timing
def ours_rate(model, images: list[str], batch_size: int, rounds: int) -> tuple[float, float]:
    """(images/s, detections per image) of a loaded predictor; one warm-up batch first."""
    list(model.predict(images[:batch_size], batch_size=batch_size))
    dets = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for res in model.predict(images, batch_size=batch_size):
            _ = res["masks"]  # PaddleX-format (cropped) masks, as PaddleX builds them
            dets += len(res["boxes"])
    dt = time.perf_counter() - t0
    n = rounds * len(images)
    return n / dt, dets / n


def paddlex_rate(py: str, name: str, model_dir: Path, images: list[str], batch_size: int, rounds: int,
                 threads: int, tmp: Path) -> dict:
    """PaddleX's images/s (or the error) in its venv, default run mode, ``threads`` threads."""
    out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"pdx_{name}_b{batch_size}_"))
    req = {"model_name": name, "model_dir": str(model_dir), "inputs": images, "batch_size": batch_size,
           "out_dir": str(out), "cpu_threads": threads, "bench_rounds": rounds, "run_mode": None}
    (out / "req.json").write_text(json.dumps(req))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PADDLE_PDX_CACHE_HOME"] = str(tmp / "pdx_home")
    proc = subprocess.run([py, str(REPO / "tests" / "paddlex_runner.py"), str(out / "req.json")],
                          capture_output=True, text=True, env=env)
    info = json.loads((out / "info.json").read_text()) if (out / "info.json").exists() else {}
    if proc.returncode != 0 or not (out / "bench.json").exists():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "?")
        return {"error": err.strip()[:160], **info}
    return {**json.loads((out / "bench.json").read_text()), **info}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="default: all 15 for (a), the six fixed-size ones for (b) and (c)")
    ap.add_argument("--quick", action="store_true",
                    help="PP-YOLOE_seg-S, Mask-RT-DETR-S/L only (unless --models), 4 images, 1 trial")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=8, help="photos per trial (default 8; --quick 4)")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the photos per trial")
    ap.add_argument("--trials", type=int, default=3, help="alternating trials; medians (default 3; --quick 1)")
    ap.add_argument("--sections", default="abc", help="any of a (params), b (ms/image), c (batching)")
    ap.add_argument("--no-paddlex", action="store_true", help="ours only")
    ap.add_argument("--export-dir", default=str(REPO / ".cache" / "bench_models"))
    args = ap.parse_args()
    if args.quick:
        args.images = min(args.images, 4)
        args.trials = 1
    unknown = [m for m in args.models or [] if m not in PARAM_MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {PARAM_MODELS}")
    param_models = args.models or (QUICK_MODELS if args.quick else PARAM_MODELS)
    models = [m for m in param_models if m in MODELS]  # timed in (b) and (c)
    py = os.environ.get("INSTSEG_PADDLEX_PYTHON", str(REPO / ".venv-paddlex" / "bin" / "python"))
    use_pdx = not args.no_paddlex and Path(py).exists()
    if not args.no_paddlex and not use_pdx:
        print(f"(PaddleX venv not found at {py}: ours only)")
    pool = image_pool()
    images = [str(pool[i % len(pool)]) for i in range(args.images)]
    root = Path(args.export_dir)
    root.mkdir(parents=True, exist_ok=True)

    import paddle

    from instseg_core import create_model

    print(f"paddle {paddle.__version__}, {os.cpu_count()} CPUs, {args.threads} threads; {len(images)} photos "
          f"x {args.rounds} round(s), median of {args.trials} alternating trial(s); input {INPUT_SIZE}x{INPUT_SIZE}")

    if "a" in args.sections:
        print("\n(a) parameters: state_dict numel without BN _mean/_variance (ppdet_models.md §8)")
        print(f"{'model':40s} {'ours (M)':>9s} {'§8 (M)':>8s} {'ours-§8':>9s} {'ours':>12s} {'oracle tsv':>12s}")
        for name in param_models:
            n = param_count(name)
            ref = REFERENCE_PARAMS_M[name]
            exact = oracle_param_count(name)
            print(f"{name:40s} {n / 1e6:9.3f} {ref:8.2f} {n / 1e6 - ref:+9.3f} {n:12,d} "
                  f"{'-' if exact is None else format(exact, ',d'):>12s}", flush=True)

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if "b" in args.sections:
            print(f"\n(b) CPU ms/image, batch 1 (ratio ours/PaddleX: < 1 = ours faster)")
            rows = []
            for name in models:
                d = export_dir(name, root)
                model = create_model(model_dir=d, device="cpu", cpu_threads=args.threads)
                ours, theirs, dets, info = [], [], None, {}
                for t in range(args.trials):
                    first_ours = t % 2 == 1  # alternate who goes first
                    if first_ours:
                        rate, dets = ours_rate(model, images, 1, args.rounds)
                        ours.append(1000 / rate)
                    if use_pdx:
                        r = paddlex_rate(py, name, d, images, 1, args.rounds, args.threads, tmp)
                        info = r
                        theirs.append(1000 / r["images_per_s"] if "images_per_s" in r else None)
                    if not first_ours:
                        rate, dets = ours_rate(model, images, 1, args.rounds)
                        ours.append(1000 / rate)
                o, p = _median(ours), _median(theirs)
                onednn = model.engine.onednn
                del model
                gc.collect()
                rows.append((name, dets, o, p, info, onednn, ours, theirs))
                note = info.get("error", "") if use_pdx else "PaddleX not run"
                print(f"  {name}: ours {[round(x) for x in ours]} ms/img, PaddleX "
                      f"{[None if x is None else round(x) for x in theirs]} ms/img {note}", flush=True)
            print(f"{'model':16s} {'det/img':>7s} {'ours ms':>8s} {'PaddleX ms':>10s} {'ours/PaddleX':>12s} "
                  f"{'oneDNN ours/PaddleX':>20s}")
            for name, dets, o, p, info, onednn, _, _ in rows:
                ratio = o / p if (o and p) else None
                pdx_mode = info.get("run_mode", "-") if use_pdx else "-"
                tail = f"  PaddleX failed: {info['error']}" if use_pdx and "error" in info else ""
                print(f"{name:16s} {_fmt(dets):>7s} {_fmt(o, '.0f'):>8s} {_fmt(p, '.0f'):>10s} "
                      f"{_fmt(ratio, '.2f'):>12s} {('on' if onednn else 'off') + ' / ' + str(pdx_mode):>20s}{tail}")

        if "c" in args.sections:
            batch_models = [m for m in BATCH_MODELS if m in models] or []
            print(f"\n(c) batching: images/s on the same {len(images)} photos (ratio to ours at batch 1)")
            for name in batch_models:
                d = export_dir(name, root)
                model = create_model(model_dir=d, device="cpu", cpu_threads=args.threads)
                rates = {1: [], 4: [], 8: []}
                pdx = {1: [], 4: []}
                infos = {}
                for t in range(args.trials):
                    order = [1, 4, 8] if t % 2 == 0 else [8, 4, 1]
                    for bs in order:
                        rates[bs].append(ours_rate(model, images, bs, args.rounds)[0])
                    if use_pdx:
                        for bs in ([1, 4] if t % 2 == 0 else [4, 1]):
                            r = paddlex_rate(py, name, d, images, bs, args.rounds, args.threads, tmp)
                            infos[bs] = r
                            pdx[bs].append(r.get("images_per_s"))
                del model
                gc.collect()
                print(f"  {name}: ours " + ", ".join(f"b{bs} {[round(x, 3) for x in v]}" for bs, v in rates.items())
                      + (" | PaddleX " + ", ".join(f"b{bs} {[None if x is None else round(x, 3) for x in v]}"
                                                   for bs, v in pdx.items()) if use_pdx else "") + " img/s", flush=True)
                med = {bs: _median(v) for bs, v in rates.items()}
                line = (f"{name:16s} ours b1 {med[1]:.2f}  b4 {med[4]:.2f} ({med[4] / med[1]:.2f}x)  "
                        f"b8 {med[8]:.2f} ({med[8] / med[1]:.2f}x)")
                if use_pdx:
                    p1, p4 = _median(pdx[1]), _median(pdx[4])
                    b4 = infos.get(4, {})
                    how = ("failed: " + b4["error"]) if "error" in b4 else (
                        "runs one image at a time (its batch-of-one list)" if b4.get("batch_of_one")
                        else "batched")
                    line += (f" | PaddleX b1 {_fmt(p1, '.2f')}  b4 {_fmt(p4, '.2f')}"
                             f" ({_fmt(p4 / p1 if p1 and p4 else None, '.2f')}x; {how})")
                print(line, flush=True)


if __name__ == "__main__":
    main()
