"""``create_model`` and the predictor: inputs -> decode -> preprocess -> engine -> postprocess.

Differences from PaddleX 3.7.2 that users may notice (each a fix, see README "Differences"):
real batching for keep-ratio models (images padded to a common size instead of ``np.stack``
failing), masks stay aligned with boxes when a degenerate box is dropped, ``batch_size`` given to
``predict`` applies to that call only, and decoding of the next batch overlaps inference.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from instseg_core.inference.engine import EngineOptions, InferenceEngine
from instseg_core.inference.model_dir import ModelDir, resolve_model_dir
from instseg_core.inference.postprocess import OutputFormatError, box_instances, solov2_instances, split_box_outputs
from instseg_core.inference.preprocess import Preprocessor, Sample, collate
from instseg_core.models import MODEL_SPECS
from instseg_core.structures import Instances

log = logging.getLogger("instseg")

MASK_FORMATS = ("paddlex", "rle")


class InstanceSegPredictor:
    """Runs one inference dir. Build it with :func:`create_model`."""

    def __init__(self, model_dir: ModelDir, engine_options: EngineOptions, threshold: float | None = None,
                 batch_size: int = 1, mask_format: str = "paddlex"):
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        self.model_dir = model_dir
        self.model_name = model_dir.model_name
        self.labels = model_dir.labels
        self.threshold = threshold
        self.batch_size = _check_batch_size(batch_size)
        self.mask_format = mask_format
        self.preprocessor = Preprocessor(model_dir.preprocess, source=str(model_dir.path / "inference.yml"))
        self.engine = InferenceEngine(model_dir.model_file, model_dir.params_file, engine_options, self.model_name)
        spec = MODEL_SPECS.get(self.model_name or "")
        # PaddleX runs SOLOv2, PP-YOLOE_seg-S and Cascade one image at a time; their official graphs are
        # not trusted with batches. Dirs exported by instseg declare `batch_inference: true|false`.
        # Other graphs are tried batched and fall back to one at a time if they refuse.
        declared = model_dir.config.get("batch_inference")
        self._one_at_a_time = (model_dir.is_solov2 or declared is False
                               or bool(spec and spec.batch1_only and declared is not True))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instseg-decode")

    # -- core: arrays in, Instances out (what the Ray pipeline calls) -----------------------------
    def effective_threshold(self, threshold: float | None = None) -> float:
        """``predict(threshold)`` > ``create_model(threshold)`` > ``inference.yml: draw_threshold``."""
        if threshold is not None:
            return float(threshold)
        if self.threshold is not None:
            return float(self.threshold)
        return self.model_dir.draw_threshold

    def preprocess(self, images: Sequence[np.ndarray]) -> list[Sample]:
        """Run the model's preprocessing on BGR uint8 images."""
        return [self.preprocessor(img) for img in images]

    def infer(self, samples: Sequence[Sample], threshold: float | None = None) -> list[Instances]:
        """Run preprocessed samples through the graph (batched when it allows) and post-process."""
        thr = self.effective_threshold(threshold)
        # Landscape and portrait images padded together waste up to half the canvas (and the masks'
        # memory): run each orientation as its own call, then restore input order.
        results: list[Instances | None] = [None] * len(samples)
        for group in _orientation_groups(samples):
            for i, inst in zip(group, self._infer_batch([samples[i] for i in group], thr)):
                results[i] = inst
        return results  # type: ignore[return-value]

    def _infer_batch(self, samples: Sequence[Sample], thr: float) -> list[Instances]:
        if self._one_at_a_time or len(samples) == 1:
            return [self._infer_one(s, thr) for s in samples]
        try:
            outputs = self.engine.run(collate(samples))
            return self._postprocess(outputs, samples, thr)
        except (OutputFormatError, RuntimeError, ValueError) as e:
            log.warning("%s: the graph does not run a batch of %d in one call (%s); running images one at a "
                        "time from now on", self.model_dir.path, len(samples), str(e).splitlines()[0])
            self._one_at_a_time = True
            return [self._infer_one(s, thr) for s in samples]

    def predict_arrays(self, images: Sequence[np.ndarray], threshold: float | None = None) -> list[Instances]:
        """Predict BGR uint8 images; returns one :class:`Instances` (dense masks) per image."""
        return self.infer(self.preprocess(images), threshold)

    def _infer_one(self, sample: Sample, thr: float) -> Instances:
        return self._postprocess(self.engine.run(collate([sample])), [sample], thr)[0]

    def _postprocess(self, outputs: list[np.ndarray], samples: Sequence[Sample], thr: float) -> list[Instances]:
        if self.model_dir.is_solov2:
            return [solov2_instances(outputs, samples[0].orig_hw, thr)]
        per_image = split_box_outputs(outputs, len(samples))
        return [box_instances(rows, masks, s.orig_hw, thr) for (rows, masks), s in zip(per_image, samples)]

    # -- PaddleX-style API --------------------------------------------------------------------------
    def predict(self, input: Any, batch_size: int | None = None, threshold: float | None = None) -> Iterator[Any]:
        """Yield one :class:`~instseg_core.results.InstanceSegResult` per input image, in input order.

        ``input``: a path, directory (recursive, sorted), http(s) or fsspec URL (``s3://...``), a BGR
        numpy array, or a list of these. A bad item raises :class:`~instseg_core.inputs.InputError`
        naming it, after the results of the batches before it were yielded.
        """
        from instseg_core.inputs import iter_input_items, load_pages
        from instseg_core.results import InstanceSegResult

        bs = _check_batch_size(batch_size) if batch_size else self.batch_size
        raw_batches = _chunks(iter_input_items(input), bs)

        def prepare_next():
            # Runs in the worker thread: listing, reading and decoding the next batch overlaps
            # inference of the current one; a bad item raises here and surfaces in input order.
            items = next(raw_batches, None)
            if items is None:
                return None
            images = [page for it in items for page in load_pages(it)]
            return images, self.preprocess([im.image for im in images])

        pending: Future = self._pool.submit(prepare_next)
        while True:
            ready = pending.result()
            if ready is None:
                return
            pending = self._pool.submit(prepare_next)
            images, samples = ready
            for item, inst in zip(images, self.infer(samples, threshold)):
                yield InstanceSegResult(input_path=item.input_path, page_index=item.page_index,
                                        input_img=item.image, instances=inst, labels=self.labels,
                                        mask_format=self.mask_format)

    __call__ = predict


def _check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _orientation_groups(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of the samples split into landscape and portrait groups (non-empty ones)."""
    landscape = [i for i, s in enumerate(samples) if s.padded_hw[1] >= s.padded_hw[0]]
    portrait = [i for i, s in enumerate(samples) if s.padded_hw[1] < s.padded_hw[0]]
    return [g for g in (landscape, portrait) if g]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def create_model(model_name: str | None = None, model_dir: str | Path | None = None, device: str | None = None,
                 threshold: float | None = None, batch_size: int = 1, *, cpu_threads: int | None = None,
                 enable_onednn: bool | None = None, use_tensorrt: bool = False, trt_precision: str = "fp16",
                 mask_format: str = "paddlex", **paddlex_kwargs: Any) -> InstanceSegPredictor:
    """Load an instance-segmentation model, as ``paddlex.create_model`` does.

    Args:
        model_name: one of the 15 official names; optional when ``model_dir`` is given (then read
            from its ``inference.yml``), and checked against the dir's ``Global.model_name``.
        model_dir: a PaddleX-format inference dir; None downloads the official model into the cache.
        device: ``cpu``, ``gpu`` or ``gpu:N``; None picks GPU 0 when available, else CPU.
        threshold: default score threshold (else ``draw_threshold`` from ``inference.yml``).
        batch_size: default images per graph call.
        cpu_threads: CPU math threads (default min(8, usable cores)).
        enable_onednn: force oneDNN on/off on CPU (default: per model; falls back if it fails).
        use_tensorrt: GPU only: Paddle-TensorRT with dynamic shapes and an engine cache.
        mask_format: ``"paddlex"`` (masks cropped to boxes, as PaddleX) or ``"rle"`` (COCO RLE).
        **paddlex_kwargs: PaddleX-only options (``pp_option``, ``use_hpip``, ``hpi_config``) are
            accepted and ignored with a warning, so PaddleX code runs unchanged.
    """
    for key in paddlex_kwargs:
        if key not in ("pp_option", "use_hpip", "hpi_config", "engine", "engine_config", "genai_config"):
            raise TypeError(f"create_model() got an unexpected keyword argument {key!r}")
        log.warning("create_model(%s=...) is a PaddleX option that instseg ignores", key)
    md = resolve_model_dir(model_name, model_dir)
    options = EngineOptions(device=device, cpu_threads=cpu_threads, enable_onednn=enable_onednn,
                            use_tensorrt=use_tensorrt, trt_precision=trt_precision,
                            trt_min_subgraph_size=int(md.config.get("min_subgraph_size", 3)))
    return InstanceSegPredictor(md, options, threshold=threshold, batch_size=batch_size, mask_format=mask_format)
