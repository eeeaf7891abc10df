"""High-performance mode vs normal mode vs PaddleX 3.7.2, CPU ms/image per backend, one run.

Each model is exported at its official input size (PP-YOLOE_seg-S and Mask-RT-DETR-S/L at 640x640,
MaskRCNN-ResNet50-FPN and SOLOv2 with their 800x1333 keep-ratio preprocessing) with the oracle-rule
weights (official weights cannot be downloaded here; with them detections are real work) and the
default score floor. Every predictor of a model is loaded once, then the trials alternate between
them (normal mode = Paddle Inference, ``use_hpip`` with ``onnxruntime`` and ``openvino``), same
threads, batch 1, real photos, PaddleX-format masks built. A backend that falls back to Paddle
Inference is reported with its reason, not timed twice. PaddleX 3.7.2 normal mode runs on the same
dir in its own venv (INSTSEG_PADDLEX_PYTHON, default .venv-paddlex/bin/python), one round of it after
each round of ours (its process start and model load are not timed). PaddleX's own
high-performance mode needs its ``ultra-infer-python`` plugin, which ``paddlex --install hpi-cpu``
downloads from paddle-model-ecology.bj.bcebos.com (not on PyPI; unreachable from this machine), so
it is not measured here.

Also checks that each backend's detections match normal mode's (count of instances over the images).

    .venv/bin/python bench/hpi.py [--models ...] [--images 6] [--rounds 3] [--threads 2] [--no-paddlex]
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, image_pool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models_cpu import paddlex_rate  # noqa: E402

MODELS = ["PP-YOLOE_seg-S", "Mask-RT-DETR-S", "Mask-RT-DETR-L", "MaskRCNN-ResNet50-FPN", "SOLOv2"]
SQUARE = {"PP-YOLOE_seg-S", "Mask-RT-DETR-S", "Mask-RT-DETR-L"}
BACKENDS = ["onnxruntime", "openvino"]


def export_dir(name: str, root: Path) -> Path:
    """An export of ``name`` at its official input size with the oracle-rule weights (reused)."""
    d = root / name
    if (d / "inference.yml").exists():
        return d
    from oracle_utils import oracle_model

    from instseg_core.export import export_model

    t0 = time.perf_counter()
    export_model(oracle_model(name), None, d, input_size=640 if name in SQUARE else None)
    print(f"  exported {name} in {time.perf_counter() - t0:.0f} s -> {d}", flush=True)
    gc.collect()
    return d


def run_once(model, images: list[str]) -> tuple[float, int]:
    """(seconds, instances) of one pass over ``images``, batch 1."""
    dets = 0
    t0 = time.perf_counter()
    for res in model.predict(images, batch_size=1):
        _ = res["masks"]  # PaddleX-format (cropped) masks, as PaddleX builds them
        dets += len(res["boxes"])
    return time.perf_counter() - t0, dets


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-paddlex", action="store_true")
    ap.add_argument("--work-dir", default=None, help="exports and ONNX files (reused between runs)")
    args = ap.parse_args()

    from instseg_core import create_model

    pool = image_pool()
    images = [str(pool[i % len(pool)]) for i in range(args.images)]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="instseg_hpi_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    pdx_py = os.environ.get("INSTSEG_PADDLEX_PYTHON") or str(REPO / ".venv-paddlex" / "bin" / "python")
    use_pdx = not args.no_paddlex and Path(pdx_py).exists()
    warnings = _Warnings()
    logging.getLogger("instseg").addHandler(warnings)
    print(f"{len(images)} photos x {args.rounds} alternating rounds, batch 1, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.1f}; work dir {work}", flush=True)

    rows = []
    for name in args.models:
        d = export_dir(name, work)
        predictors = {"normal": create_model(model_dir=d, device="cpu", cpu_threads=args.threads)}
        notes = {}
        for backend in BACKENDS:
            warnings.messages.clear()
            t0 = time.perf_counter()
            m = create_model(model_dir=d, device="cpu", cpu_threads=args.threads, use_hpip=True,
                             hpi_config={"backend": backend})
            load_s = time.perf_counter() - t0
            if m.engine.backend != backend:
                notes[backend] = "falls back: " + (warnings.messages[-1] if warnings.messages else "?")[-160:]
                continue
            predictors[backend] = m
            notes[backend] = f"first load (ONNX conversion included) {load_s:.1f} s"
        for m in predictors.values():  # warm-up
            run_once(m, images[:1])
        times: dict[str, list[float]] = {k: [] for k in predictors}
        dets: dict[str, int] = {}
        pdx_times: list[float] = []
        pdx = None
        for _ in range(args.rounds):
            for key, m in predictors.items():
                seconds, n = run_once(m, images)
                times[key].append(1000 * seconds / len(images))
                dets[key] = n
            if use_pdx:  # PaddleX's round in the same alternation (its process start and load not timed)
                pdx = paddlex_rate(pdx_py, name, d, images, 1, 1, args.threads, work)
                if "images_per_s" in pdx:
                    pdx_times.append(1000 / pdx["images_per_s"])
        ms = {k: statistics.median(v) for k, v in times.items()}
        pdx_ms = statistics.median(pdx_times) if pdx_times else None
        best = min((k for k in ms if k != "normal"), key=lambda k: ms[k], default=None)
        rows.append((name, ms, dets, notes, pdx_ms, pdx, best))
        line = ", ".join(f"{k} {v:.0f} ms ({dets[k]} inst)" for k, v in ms.items())
        print(f"{name}: {line}; PaddleX normal {pdx_ms and f'{pdx_ms:.0f} ms' or (pdx or {}).get('error', '-')}",
              flush=True)
        for backend, note in notes.items():
            print(f"  {backend}: {note}", flush=True)
        del predictors
        gc.collect()

    print("\n| model | normal ms | ONNX Runtime ms | OpenVINO ms | best HPI / normal | PaddleX normal ms | "
          "ours HPI vs PaddleX normal |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, dets, notes, pdx_ms, pdx, best in rows:
        cells = [f"{ms[b]:.0f}" if b in ms else "fallback" for b in BACKENDS]
        speed = f"{ms['normal'] / ms[best]:.2f}x ({best})" if best else "1.00x (no backend runs it)"
        hpi_ms = ms[best] if best else ms["normal"]
        vs_pdx = f"{pdx_ms / hpi_ms:.2f}x" if pdx_ms else "-"
        print(f"| {name} | {ms['normal']:.0f} | {cells[0]} | {cells[1]} | {speed} | "
              f"{f'{pdx_ms:.0f}' if pdx_ms else '-'} | {vs_pdx} |")
    print("\nspeed-ups are normal-mode ms / backend ms (higher is better), measured alternately in this run")


if __name__ == "__main__":
    main()
