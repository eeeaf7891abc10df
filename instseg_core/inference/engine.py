"""Paddle Inference engine: one compiled graph, fed by input name, on CPU or GPU.

Device strings: ``cpu``, ``gpu`` or ``gpu:N``. On CPU, oneDNN (MKL-DNN) is on by default except for
models known to fail or to be slower under it; a graph that still fails under oneDNN is rebuilt
without it, with a warning. On GPU, ``use_tensorrt=True`` opts in to Paddle-TensorRT (FP16 by
default) with dynamic shapes and a serialized-engine cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("instseg")

# PaddleX 3.7.2 runs these without oneDNN on CPU (their graphs fail or slow down under it).
ONEDNN_OFF_BY_DEFAULT = frozenset({
    "Cascade-MaskRCNN-ResNet50-FPN", "Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN", "Mask-RT-DETR-M",
    "Mask-RT-DETR-S", "MaskRCNN-ResNeXt101-vd-FPN", "MaskRCNN-ResNet101-FPN", "MaskRCNN-ResNet101-vd-FPN",
    "MaskRCNN-ResNet50-FPN", "MaskRCNN-ResNet50-vd-FPN", "MaskRCNN-ResNet50", "SOLOv2",
})


def parse_device(device: str | None) -> tuple[str, int]:
    """``'cpu'`` / ``'gpu'`` / ``'gpu:1'`` -> (kind, index). None picks GPU 0 when Paddle has CUDA."""
    import paddle

    if device is None:
        device = "gpu:0" if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else "cpu"
    kind, _, idx = device.strip().lower().partition(":")
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu', 'gpu' or 'gpu:N'")
    if kind == "gpu" and not paddle.device.is_compiled_with_cuda():
        raise ValueError(f"device {device!r} requested but this PaddlePaddle build has no CUDA "
                         "(install paddlepaddle-gpu, see README)")
    try:
        index = int(idx) if idx else 0
    except ValueError:
        raise ValueError(f"bad device index in {device!r}") from None
    return kind, index


@dataclass
class EngineOptions:
    """How to run the graph. ``enable_onednn=None`` means: the per-model default."""

    device: str | None = "cpu"
    cpu_threads: int | None = None  # None: min(8, usable cores)
    enable_onednn: bool | None = None
    use_tensorrt: bool = False
    trt_precision: str = "fp16"  # fp16 | fp32
    trt_min_subgraph_size: int = 3
    # name -> (min, opt, max) shapes; defaults suit 640x640 and 800x1333 inputs up to batch 8
    trt_shapes: dict[str, Sequence[Sequence[int]]] = field(default_factory=dict)
    trt_cache_dir: str | None = None


class InferenceEngine:
    """A Paddle Inference predictor with inputs fed by name and outputs returned in graph order."""

    backend = "paddle"

    def __init__(self, model_file: Path, params_file: Path, options: EngineOptions, model_name: str | None = None):
        self.model_file, self.params_file = Path(model_file), Path(params_file)
        self.options = options
        self.device_kind, self.device_index = parse_device(options.device)
        onednn = options.enable_onednn
        if onednn is None:
            onednn = self.device_kind == "cpu" and model_name not in ONEDNN_OFF_BY_DEFAULT
        self.onednn = bool(onednn) and self.device_kind == "cpu"
        self._predictor = self._create(self.onednn)
        self._verified = False  # becomes True after the first successful run

    def _config(self, onednn: bool, new_ir: bool = True):
        from paddle import inference as pi

        # a graph without parameters (the split post-process graph) has no weights file
        cfg = pi.Config(str(self.model_file), str(self.params_file) if self.params_file.is_file() else "")
        if self.device_kind == "gpu":
            cfg.enable_use_gpu(256, self.device_index)
            if hasattr(cfg, "exp_disable_mixed_precision_ops"):
                cfg.exp_disable_mixed_precision_ops({"feed", "fetch"})
            if self.options.use_tensorrt:
                self._configure_tensorrt(cfg)
        else:
            cfg.disable_gpu()
            if onednn:
                cfg.enable_mkldnn()
                cfg.set_mkldnn_cache_capacity(10)
            else:
                cfg.disable_mkldnn()
            cfg.set_cpu_math_library_num_threads(int(self.options.cpu_threads or default_cpu_threads()))
        if hasattr(cfg, "enable_new_ir"):
            cfg.enable_new_ir(new_ir)
        if hasattr(cfg, "enable_new_executor"):
            cfg.enable_new_executor()
        if hasattr(cfg, "set_optimization_level"):
            cfg.set_optimization_level(3)
        cfg.enable_memory_optim()
        cfg.disable_glog_info()
        return cfg

    def _configure_tensorrt(self, cfg) -> None:
        from paddle import inference as pi

        precision = pi.PrecisionType.Half if self.options.trt_precision == "fp16" else pi.PrecisionType.Float32
        cache = Path(self.options.trt_cache_dir or (self.model_file.parent / ".cache" / "tensorrt"))
        cache.mkdir(parents=True, exist_ok=True)
        cfg.set_optim_cache_dir(str(cache))
        cfg.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=8,
                                   min_subgraph_size=self.options.trt_min_subgraph_size,
                                   precision_mode=precision, use_static=True, use_calib_mode=False)
        shapes = self.options.trt_shapes or {
            "image": ([1, 3, 320, 320], [1, 3, 800, 1344], [8, 3, 1344, 1344]),
            "im_shape": ([1, 2], [1, 2], [8, 2]),
            "scale_factor": ([1, 2], [1, 2], [8, 2]),
        }
        mins = {k: list(v[0]) for k, v in shapes.items()}
        opts = {k: list(v[1]) for k, v in shapes.items()}
        maxs = {k: list(v[2]) for k, v in shapes.items()}
        cfg.set_trt_dynamic_shape_info(mins, maxs, opts)

    def _create(self, onednn: bool):
        """Build the predictor; fall back (with a warning) to plain CPU kernels when the graph fails
        under oneDNN, and for legacy ``.pdmodel`` graphs to the old executor if PIR rejects them."""
        from paddle import inference as pi

        attempts = [(onednn, True)] + ([(False, True)] if onednn else [])
        if self.model_file.suffix == ".pdmodel":
            attempts.append((False, False))
        error: Exception | None = None
        for i, (use_onednn, new_ir) in enumerate(attempts):
            try:
                predictor = pi.create_predictor(self._config(use_onednn, new_ir))
            except Exception as e:  # noqa: BLE001 - Paddle raises plain RuntimeError/ValueError variants
                error = e
                if i + 1 < len(attempts):
                    log.warning("graph %s failed to build (%s, oneDNN %s): %s; retrying with %s", self.model_file,
                                "PIR" if new_ir else "legacy executor", "on" if use_onednn else "off",
                                str(e).splitlines()[0] if str(e) else type(e).__name__,
                                "oneDNN off" if attempts[i + 1][1] else "the legacy executor")
                continue
            self.onednn = use_onednn
            return predictor
        raise RuntimeError(f"cannot load inference graph {self.model_file}: {error}") from error

    @property
    def input_names(self) -> list[str]:
        return list(self._predictor.get_input_names())

    @property
    def output_names(self) -> list[str]:
        return list(self._predictor.get_output_names())

    def _run_once(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        p = self._predictor
        for name in p.get_input_names():
            if name not in inputs:
                raise ValueError(f"graph {self.model_file} wants input {name!r}; have {sorted(inputs)}")
            p.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(inputs[name]))
        p.run()
        return [p.get_output_handle(n).copy_to_cpu() for n in p.get_output_names()]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph on named inputs; returns the outputs in the graph's order."""
        try:
            out = self._run_once(inputs)
        except Exception as e:  # noqa: BLE001
            if not (self.onednn and not self._verified) or is_out_of_memory(e):
                # running out of memory is not a oneDNN problem: rebuilding without oneDNN would
                # only make every later image slower, and the next attempt fail the same way
                raise
            # Some PIR graphs build under oneDNN but fail at the first run: retry without it.
            log.warning("graph %s failed under oneDNN at run time (%s); falling back to plain CPU kernels",
                        self.model_file, str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.onednn = False
            self._predictor = self._create(False)
            out = self._run_once(inputs)
        self._verified = True
        return out


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception from Paddle (or numpy) means an allocation failed."""
    if isinstance(error, MemoryError):
        return True
    text = f"{type(error).__name__}: {error}".lower()
    return any(s in text for s in ("out of memory", "resourceexhausted", "resource exhausted", "cannot allocate",
                                   "bad_alloc", "failed to allocate"))


def default_cpu_threads() -> int:
    """PaddleX uses 8-10 threads; cap at the cores this process may use."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # non-Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))
