"""High-performance mode: ``create_model(..., use_hpip=True, hpi_config=...)``, as PaddleX's.

``hpi_config`` takes PaddleX's keys: ``backend`` (``paddle`` | ``onnxruntime`` | ``openvino`` |
``tensorrt``), ``backend_config`` (that backend's options) and ``auto_config`` (default true: with
no ``backend``, take the first backend of :data:`AUTO_BACKENDS` for the model's family and device
that can run it). PaddleX's context keys (``model_name``, ``device_type``, ``device_id``,
``hpi_info``, ``auto_paddle2onnx``) are accepted and ignored; anything else is an error.

How each backend runs a model dir:

* ``paddle``: Paddle Inference on the whole graph (normal mode, with ``run_mode`` / threads).
* ``tensorrt``: Paddle-TensorRT on a GPU (FP16 unless ``backend_config.precision`` is ``fp32``).
* ``onnxruntime`` / ``openvino``: dirs exported by instseg carry a split graph (``split_graphs`` in
  ``inference.yml``): the network up to its raw head outputs at a static size, converted to ONNX
  (:mod:`~instseg_core.inference.onnx_convert`) and run by the backend, then the post-process graph
  (NMS, masks) in Paddle Inference, so outputs keep the normal graph's layout and memory bounds.
  Other dirs (official PaddleX ones, R-CNN and SOLOv2 exports) have their whole graph converted;
  the converter fails on most of them, and then the predictor falls back.

A backend that cannot run a model (not installed, a converter failure, a graph the runtime
rejects, an error at the first run) never gives a wrong result: the predictor logs one warning
naming the backend and the reason and runs the model on Paddle Inference instead.
"""
from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from instseg_core.inference.engine import (
    EngineOptions,
    InferenceEngine,
    default_cpu_threads,
    is_out_of_memory,
    parse_device,
)
from instseg_core.inference.model_dir import ModelDir

log = logging.getLogger("instseg")

__all__ = ["AUTO_BACKENDS", "BACKENDS", "HPIConfig", "create_engine", "hpi_from_flags", "parse_hpi_config"]

BACKENDS = ("paddle", "onnxruntime", "openvino", "tensorrt")

# Backends to try, best first, per family (families.py names) and device, from bench/hpi.py on this
# project's exports (README "High-performance mode" has the numbers). Families without a split graph
# keep Paddle first: the converter fails on their whole graphs.
AUTO_BACKENDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("PPYOLOE_seg", "cpu"): ("openvino", "onnxruntime", "paddle"),
    ("Mask-RT-DETR", "cpu"): ("openvino", "onnxruntime", "paddle"),
    ("MaskRCNN", "cpu"): ("paddle",),
    ("CascadeRCNN", "cpu"): ("paddle",),
    ("SOLOv2", "cpu"): ("paddle",),
}
AUTO_GPU = ("tensorrt", "paddle")  # every family on a GPU (unmeasured here: no GPU machine)

# backend -> the backend_config keys it understands
BACKEND_OPTIONS: dict[str, frozenset[str]] = {
    "paddle": frozenset({"run_mode", "cpu_num_threads", "enable_mkldnn"}),
    "onnxruntime": frozenset({"cpu_num_threads"}),
    "openvino": frozenset({"cpu_num_threads"}),
    "tensorrt": frozenset({"precision", "min_subgraph_size"}),
}
PADDLE_RUN_MODES = ("paddle", "mkldnn", "trt_fp32", "trt_fp16")
PADDLEX_CONTEXT_KEYS = frozenset({"model_name", "device_type", "device_id", "hpi_info", "auto_paddle2onnx"})


@dataclass(frozen=True)
class HPIConfig:
    """High-performance settings (PaddleX's ``hpi_config`` keys)."""

    backend: str | None = None
    backend_config: dict[str, Any] = field(default_factory=dict)
    auto_config: bool = True

    def as_dict(self) -> dict[str, Any]:
        """PaddleX's dict form (for job configs, summary.json, Serve settings)."""
        return {"backend": self.backend, "backend_config": dict(self.backend_config), "auto_config": self.auto_config}


def hpi_from_flags(backend: str | None, config: str | None) -> HPIConfig:
    """The config of ``--hpi-backend`` / ``--hpi-config`` (the CLI and the jobs): the parsed
    ``config`` string with ``backend``, when given, as its backend."""
    parsed = parse_hpi_config(config)
    return parse_hpi_config(replace(parsed, backend=backend)) if backend else parsed


def parse_hpi_config(value: HPIConfig | Mapping[str, Any] | str | None) -> HPIConfig:
    """An :class:`HPIConfig` from a dict, a Python/JSON literal string (PaddleX's CLI form) or None;
    a ValueError names any unknown key, backend or option."""
    if isinstance(value, HPIConfig):
        return _checked(value)
    if value is None:
        return HPIConfig()
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip()) if value.strip() else {}
        except (ValueError, SyntaxError):
            raise ValueError(f"hpi_config must be a dict literal such as \"{{'backend': 'onnxruntime'}}\", "
                             f"got {value!r}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"hpi_config must be a dict, got {type(value).__name__}")
    unknown = set(value) - {"backend", "backend_config", "auto_config"} - PADDLEX_CONTEXT_KEYS
    if unknown:
        raise ValueError(f"unknown hpi_config key(s) {sorted(unknown)}; known: backend, backend_config, auto_config")
    backend_config = value.get("backend_config") or {}
    if not isinstance(backend_config, Mapping):
        raise ValueError(f"hpi_config.backend_config must be a dict, got {backend_config!r}")
    auto = value.get("auto_config", True)
    if not isinstance(auto, bool):
        raise ValueError(f"hpi_config.auto_config must be true or false, got {auto!r}")
    backend = value.get("backend")
    return _checked(HPIConfig(backend=str(backend).lower() if backend is not None else None,
                              backend_config=dict(backend_config), auto_config=auto))


def _checked(cfg: HPIConfig) -> HPIConfig:
    if cfg.backend is not None and cfg.backend not in BACKENDS:
        raise ValueError(f"unknown hpi backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    if cfg.backend_config and cfg.backend is None:
        raise ValueError("hpi_config.backend_config needs hpi_config.backend (which backend it configures)")
    if cfg.backend is not None:
        extra = set(cfg.backend_config) - BACKEND_OPTIONS[cfg.backend]
        if extra:
            raise ValueError(f"unknown backend_config option(s) {sorted(extra)} for {cfg.backend}; known: "
                             f"{', '.join(sorted(BACKEND_OPTIONS[cfg.backend]))}")
        mode = cfg.backend_config.get("run_mode")
        if mode is not None and mode not in PADDLE_RUN_MODES:
            raise ValueError(f"backend_config.run_mode must be one of {PADDLE_RUN_MODES}, got {mode!r}")
        precision = cfg.backend_config.get("precision")
        if precision is not None and precision not in ("fp16", "fp32"):
            raise ValueError(f"backend_config.precision must be fp16 or fp32, got {precision!r}")
        threads = cfg.backend_config.get("cpu_num_threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"backend_config.cpu_num_threads must be a positive integer, got {threads!r}")
    return cfg


def backend_candidates(cfg: HPIConfig, family: str, device_kind: str) -> tuple[str, ...]:
    """The backends to try in order: the chosen one, else the family's table row (auto_config)."""
    if cfg.backend is not None:
        return (cfg.backend,)
    if not cfg.auto_config:
        return ("paddle",)
    if device_kind == "gpu":
        return AUTO_GPU
    return AUTO_BACKENDS.get((family, device_kind), ("paddle",))


def create_engine(model_dir: ModelDir, options: EngineOptions, family: str, hpi: HPIConfig | None = None):
    """The engine for a model dir: Paddle Inference (``hpi`` None, normal mode), else the first
    backend of :func:`backend_candidates` that builds, Paddle Inference when none does (one warning
    with the reasons)."""
    if hpi is None:
        return _paddle_engine(model_dir, options)
    device_kind, device_index = parse_device(options.device)
    reasons: list[str] = []
    for backend in backend_candidates(hpi, family, device_kind):
        config = hpi.backend_config if backend == hpi.backend else {}
        try:
            engine = _build(backend, config, model_dir, options, device_kind, device_index)
        except Exception as e:  # noqa: BLE001 - runtimes raise their own types (onnxruntime's Fail, ...)
            reasons.append(f"{backend}: {_first_line(e)}")
            continue
        if reasons:
            log.warning("%s: high-performance mode uses %s (%s)", model_dir.path, backend, "; ".join(reasons))
        else:
            log.info("%s: high-performance mode uses %s", model_dir.path, backend)
        return engine
    log.warning("%s: no high-performance backend can run this model, using Paddle Inference (%s)",
                model_dir.path, "; ".join(reasons))
    return _paddle_engine(model_dir, options)


def _paddle_engine(model_dir: ModelDir, options: EngineOptions) -> InferenceEngine:
    """Normal mode: the dir's whole graph in Paddle Inference."""
    return InferenceEngine(model_dir.model_file, model_dir.params_file, options, model_dir.model_name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _build(backend: str, config: Mapping[str, Any], model_dir: ModelDir, options: EngineOptions,
           device_kind: str, device_index: int):
    threads = int(config.get("cpu_num_threads") or options.cpu_threads or default_cpu_threads())
    if backend == "paddle":
        mode = config.get("run_mode")
        opts = replace(options, cpu_threads=threads)
        if mode == "mkldnn" or config.get("enable_mkldnn") is True:
            opts = replace(opts, enable_onednn=True)
        elif mode == "paddle" or config.get("enable_mkldnn") is False:
            opts = replace(opts, enable_onednn=False)
        elif mode in ("trt_fp32", "trt_fp16"):
            if device_kind != "gpu":
                raise RuntimeError(f"run_mode {mode} needs a GPU")
            opts = replace(opts, use_tensorrt=True, trt_precision=mode[4:])
        return _paddle_engine(model_dir, opts)
    if backend == "tensorrt":
        if device_kind != "gpu":
            raise RuntimeError("TensorRT needs a GPU")
        opts = replace(options, use_tensorrt=True, trt_precision=config.get("precision", "fp16"),
                       trt_min_subgraph_size=int(config.get("min_subgraph_size", options.trt_min_subgraph_size)))
        return _paddle_engine(model_dir, opts)
    if backend == "openvino" and device_kind != "cpu":
        raise RuntimeError("OpenVINO runs on the CPU only here")
    return _onnx_engine(backend, model_dir, options, threads, device_kind, device_index)


def _onnx_engine(backend: str, model_dir: ModelDir, options: EngineOptions, threads: int, device_kind: str,
                 device_index: int):
    from instseg_core.inference.backends import OnnxRuntimeEngine, OpenVINOEngine, SplitEngine
    from instseg_core.inference.onnx_convert import onnx_for

    split = model_dir.config.get("split_graphs")
    if split:
        graph = (model_dir.path / str(split["head"])).with_suffix(".json")
        params, input_shape = graph.with_suffix(".pdiparams"), [int(d) for d in split["input_shape"]]
    else:
        graph, params, input_shape = model_dir.model_file, model_dir.params_file, None
    onnx_file = onnx_for(graph, params)
    if backend == "onnxruntime":
        fast = OnnxRuntimeEngine(onnx_file, threads=threads, device_kind=device_kind, device_index=device_index)
    else:
        fast = OpenVINOEngine(onnx_file, threads=threads, input_shape=input_shape)

    def reference() -> InferenceEngine:
        return _paddle_engine(model_dir, options)

    if not split:
        return CheckedEngine(fast, reference, str(model_dir.path), compare=True)
    post_graph = (model_dir.path / str(split["post"])).with_suffix(".json")
    post = InferenceEngine(post_graph, post_graph.with_suffix(".pdiparams"), replace(options, cpu_threads=threads),
                           model_dir.model_name)
    return CheckedEngine(SplitEngine(fast, post, split["raw_outputs"]), reference, str(model_dir.path),
                         compare=False)


class CheckedEngine:
    """A high-performance engine on probation until its first call succeeds.

    An error at the first call (a runtime that accepted the file but cannot run it) makes the
    predictor warn and continue on Paddle Inference for good. With ``compare`` (a whole graph
    converted by paddle2onnx: nothing tells whether its top-k, NMS and mask ops compute what the
    Paddle graph does) the first batch also runs on Paddle Inference, and a different result is
    treated the same way. Split graphs are not compared: their post-process is Paddle's own.
    """

    def __init__(self, fast, make_reference: Callable[[], InferenceEngine], where: str, *, compare: bool):
        self.fast, self.make_reference, self.where, self.compare = fast, make_reference, where, compare
        self.backend = fast.backend
        self._checked = False

    @property
    def input_names(self) -> list[str]:
        return self.fast.input_names

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._checked:
            return self.fast.run(inputs)
        # built at most once: it runs the comparison, and stays as the engine if the backend fails
        reference = self.make_reference() if self.compare else None
        expected = reference.run(inputs) if reference is not None else None
        try:
            got = self.fast.run(inputs)
            problem = _difference(expected, got) if expected is not None else None
        except Exception as e:  # noqa: BLE001 - any failure at the first call means: not this backend
            if is_out_of_memory(e):
                raise  # not the backend's fault; the caller's memory handling applies
            problem, got = f"it failed at its first run: {_first_line(e)}", None
        self._checked = True
        if problem is None:
            return got
        log.warning("%s: %s cannot be used (%s); using Paddle Inference", self.where, self.backend, problem)
        self.fast = reference if reference is not None else self.make_reference()
        self.backend = "paddle"
        return expected if expected is not None else self.fast.run(inputs)


def _difference(expected: list[np.ndarray], got: list[np.ndarray]) -> str | None:
    """Why two graphs' outputs are not the same result (None when they are): float outputs within
    1e-3 relative / 1e-2 absolute, integer outputs (masks, counts) equal but for 0.1% of values."""
    if len(expected) != len(got):
        return f"{len(got)} outputs instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, got)):
        if a.shape != b.shape:
            return f"output {i} has shape {b.shape} instead of {a.shape}"
        if not a.size:
            continue
        if np.issubdtype(a.dtype, np.floating):
            if not np.allclose(a, b, rtol=1e-3, atol=1e-2):
                return f"output {i} differs by up to {float(np.abs(a.astype(np.float64) - b).max()):.3g}"
        elif np.count_nonzero(a != b) > 1e-3 * a.size:
            return f"output {i} differs in {np.count_nonzero(a != b)} of {a.size} values"
    return None
