"""The high-performance engines: ONNX Runtime and OpenVINO, and the split engine that pairs one of
them (the network up to its raw head outputs) with Paddle Inference (the post-process).

Every engine has the interface of :class:`~instseg_core.inference.engine.InferenceEngine`: inputs
fed by name, ``run(inputs) -> outputs in the graph's order``, plus ``backend`` (its name).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

__all__ = ["Engine", "OnnxRuntimeEngine", "OpenVINOEngine", "SplitEngine"]


class Engine(Protocol):
    """What the predictor needs from an engine."""

    backend: str

    @property
    def input_names(self) -> list[str]: ...

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def missing_package(package: str) -> ImportError:
    """The error for a high-performance package that is not installed, with the install command."""
    return ImportError(f'{package} is not installed: pip install "instseg[hpi]" (paddle2onnx, onnxruntime, openvino)')


class OnnxRuntimeEngine:
    """An ONNX file in ONNX Runtime: the CPU provider, or CUDA's on a GPU when installed."""

    backend = "onnxruntime"

    def __init__(self, onnx_file: Path, *, threads: int, device_kind: str = "cpu", device_index: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_package("onnxruntime") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: the converter's unused initializers are warned one by one
        providers: list = ["CPUExecutionProvider"]
        if device_kind == "gpu":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": device_index}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(onnx_file), opts, providers=providers)
        self._inputs = [i.name for i in self.session.get_inputs()]
        # a graph exported for one image per call (the split head graphs) runs a batch image by image
        self._batch1 = all(i.shape and i.shape[0] == 1 for i in self.session.get_inputs())

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._batch1:
            return _image_by_image(lambda one: list(self.session.run(None, one)), inputs, self._inputs)
        return list(self.session.run(None, {name: np.ascontiguousarray(inputs[name]) for name in self._inputs}))


class OpenVINOEngine:
    """An ONNX file compiled by OpenVINO for the CPU, one image per inference.

    The model is reshaped to batch 1 at its own static input size before compiling (OpenVINO
    compiles dynamic shapes poorly, and a batch of CPU inferences costs what one batched call
    does); a batch is run image by image and concatenated.
    """

    backend = "openvino"

    def __init__(self, onnx_file: Path, *, threads: int, input_shape: Sequence[int] | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise missing_package("openvino") from None
        core = ov.Core()
        model = core.read_model(str(onnx_file))
        if input_shape is not None and len(model.inputs) == 1:
            model.reshape({model.inputs[0].get_any_name(): [1, *[int(d) for d in input_shape[1:]]]})
        # f32: the CPU plugin would otherwise pick a lower precision on some CPUs (boxes 0.5 px off here)
        self._compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads),
                                                           "INFERENCE_PRECISION_HINT": "f32",
                                                           "PERFORMANCE_HINT": "LATENCY"})
        self._request = self._compiled.create_infer_request()
        self._inputs = [i.get_any_name() for i in self._compiled.inputs]

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        def one(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            result = self._request.infer(feed)
            return [np.array(result[out]) for out in self._compiled.outputs]

        return _image_by_image(one, inputs, self._inputs)


def _image_by_image(run_one, inputs: dict[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    """Run a batch-1 graph on each image of a batch and concatenate the outputs."""
    n = int(inputs[names[0]].shape[0])
    per_image = [run_one({name: np.ascontiguousarray(inputs[name][i:i + 1]) for name in names}) for i in range(n)]
    if n == 1:
        return per_image[0]
    return [np.concatenate(parts, axis=0) for parts in zip(*per_image)]


class SplitEngine:
    """The head graph on a fast backend, its raw outputs fed (in order) to the post-process graph.

    The post-process graph is the one the normal graph ends with, so the outputs have the normal
    graph's layout and memory bounds; only the head's numbers come from the other backend.
    """

    def __init__(self, head: Engine, post: Engine, raw_names: Sequence[str]):
        self.head, self.post, self.raw_names = head, post, list(raw_names)
        self.backend = head.backend

    @property
    def input_names(self) -> list[str]:
        return ["im_shape", "image", "scale_factor"]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        raw = self.head.run({"image": inputs["image"]})
        if len(raw) != len(self.raw_names):
            raise RuntimeError(f"the head graph gave {len(raw)} outputs, expected {len(self.raw_names)} "
                               f"({', '.join(self.raw_names)})")
        # the caller's threshold: the post-process draws no mask for what it drops (0: keep all)
        threshold = inputs.get("threshold", np.zeros([1], np.float32))
        feed = {"im_shape": inputs["im_shape"], "scale_factor": inputs["scale_factor"], "threshold": threshold}
        feed.update(dict(zip(self.raw_names, raw)))
        return self.post.run(feed)
