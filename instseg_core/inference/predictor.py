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

from instseg_core.families import family_of_arch
from instseg_core.inference.engine import EngineOptions
from instseg_core.inference.hpi import HPIConfig, create_engine, parse_hpi_config
from instseg_core.inference.model_dir import ModelDir, resolve_model_dir
from instseg_core.inference.postprocess import OutputFormatError
from instseg_core.inference.preprocess import Preprocessor, Sample, collate
from instseg_core.models import MODEL_SPECS
from instseg_core.structures import Instances

log = logging.getLogger("instseg")

MASK_FORMATS = ("paddlex", "rle")

# The longest side, in pixels, at which a graph is asked to draw full-image masks. Graphs in
# PaddleX's format size their masks from ``im_shape / scale_factor`` (candidates x H x W, float32
# or int32 in official exports: 13 GB for PP-YOLOE_seg-S on a 12 MP photo); above this the graph is
# told the image is smaller and only the kept masks are upsampled. Photos up to 1333 px (COCO's
# 800x1333 and smaller) are untouched, so their outputs stay bit-identical to PaddleX.
DEFAULT_MAX_MASK_SIDE = 1333


class InstanceSegPredictor:
    """Runs one inference dir. Build it with :func:`create_model`."""

    def __init__(self, model_dir: ModelDir, engine_options: EngineOptions, threshold: float | None = None,
                 batch_size: int = 1, mask_format: str = "paddlex",
                 max_mask_side: int | None = DEFAULT_MAX_MASK_SIDE, hpi: HPIConfig | None = None):
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        self.max_mask_side = check_max_mask_side(max_mask_side)
        if threshold is not None:
            threshold = check_threshold(threshold)
        self.model_dir = model_dir
        self.model_name = model_dir.model_name
        self.labels = model_dir.labels
        self.threshold = threshold
        self.batch_size = _check_batch_size(batch_size)
        self.mask_format = mask_format
        self.preprocessor = Preprocessor(model_dir.preprocess, source=str(model_dir.path / "inference.yml"))
        family = family_of_arch(model_dir.arch)
        # hpi None: normal mode (Paddle Inference); else the backend hpi picks (see inference.hpi)
        self.engine = create_engine(model_dir, engine_options, family.name, hpi)
        # the graph's output convention follows its arch (MaskRCNN and Cascade share RCNN's)
        self._to_instances = family.postprocess
        spec = MODEL_SPECS.get(self.model_name or "")
        # PaddleX runs SOLOv2, PP-YOLOE_seg-S and Cascade one image at a time; their official graphs are
        # not trusted with batches. Dirs exported by instseg declare `batch_inference: true|false`.
        # Other graphs are tried batched and fall back to one at a time if they refuse.
        declared = model_dir.config.get("batch_inference")
        self._one_at_a_time = (model_dir.is_solov2 or declared is False
                               or bool(spec and spec.batch1_only and declared is not True))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instseg-decode")
        # exports made by instseg drop detections at or below this inside the graph (no mask drawn)
        floor = model_dir.config.get("score_floor")
        self.score_floor = float(floor) if floor is not None else None
        self._warned_floor = False

    # -- core: arrays in, Instances out (what the Ray pipeline calls) -----------------------------
    def effective_threshold(self, threshold: float | None = None) -> float:
        """``predict(threshold)`` > ``create_model(threshold)`` > ``inference.yml: draw_threshold``."""
        if threshold is not None:
            return check_threshold(threshold)
        if self.threshold is not None:
            return float(self.threshold)
        return self.model_dir.draw_threshold

    def preprocess(self, images: Sequence[np.ndarray]) -> list[Sample]:
        """Run the model's preprocessing on BGR uint8 images (and set each one's ``mask_scale``)."""
        samples = [self.preprocessor(img) for img in images]
        for s in samples:
            s.mask_scale = mask_scale_for(s.orig_hw, self.max_mask_side)
        return samples

    def infer(self, samples: Sequence[Sample], threshold: float | None = None, *,
              rle: bool | None = None) -> list[Instances]:
        """Run preprocessed samples through the graph (batched when it allows) and post-process.

        ``rle`` (default: ``mask_format == "rle"``): return masks as COCO RLE, encoded one at a
        time, so no image's full set of dense masks is ever held (what a labelling job wants).
        """
        thr = self.effective_threshold(threshold)
        if self.score_floor is not None and thr < self.score_floor and not self._warned_floor:
            self._warned_floor = True
            log.warning("%s: threshold %g is below the graph's score_floor %g (inference.yml): detections scoring "
                        "at or below %g are not in its output; re-export with a lower score_floor to see them",
                        self.model_dir.path, thr, self.score_floor, self.score_floor)
        rle = (self.mask_format == "rle") if rle is None else bool(rle)
        # Landscape and portrait images padded together waste up to half the canvas (and the masks'
        # memory): run each orientation as its own call, then restore input order.
        results: list[Instances | None] = [None] * len(samples)
        for group in _orientation_groups(samples):
            for call in _canvas_chunks(group, samples, self.max_mask_side):
                for i, inst in zip(call, self._infer_batch([samples[i] for i in call], thr, rle)):
                    results[i] = inst
        return results  # type: ignore[return-value]

    def _infer_batch(self, samples: Sequence[Sample], thr: float, rle: bool) -> list[Instances]:
        if self._one_at_a_time or len(samples) == 1:
            return [self._infer_one(s, thr, rle) for s in samples]
        try:
            outputs = self.engine.run(_graph_inputs(samples, thr))
            return self._postprocess(outputs, samples, thr, rle)
        except (OutputFormatError, RuntimeError, ValueError) as e:
            log.warning("%s: the graph does not run a batch of %d in one call (%s); running images one at a "
                        "time from now on", self.model_dir.path, len(samples), str(e).splitlines()[0])
            self._one_at_a_time = True
            return [self._infer_one(s, thr, rle) for s in samples]

    def predict_arrays(self, images: Sequence[np.ndarray], threshold: float | None = None, *,
                       rle: bool | None = None) -> list[Instances]:
        """Predict BGR uint8 images; returns one :class:`Instances` per image (dense bool masks, or
        RLE with ``rle=True`` / ``mask_format="rle"``)."""
        return self.infer(self.preprocess(images), threshold, rle=rle)

    def _infer_one(self, sample: Sample, thr: float, rle: bool = False) -> Instances:
        return self._postprocess(self.engine.run(_graph_inputs([sample], thr)), [sample], thr, rle)[0]

    def _postprocess(self, outputs: list[np.ndarray], samples: Sequence[Sample], thr: float,
                     rle: bool = False) -> list[Instances]:
        return self._to_instances(outputs, [s.orig_hw for s in samples], thr,
                                  mask_scales=[s.mask_scale for s in samples], rle=rle)

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


def check_threshold(threshold: Any) -> float:
    """A score threshold as float in [0, 1]; anything else is a ValueError naming the value."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    return value


def check_max_mask_side(value: Any) -> int | None:
    """``max_mask_side``: None (no limit) or an integer >= 32."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 32:
        raise ValueError(f"max_mask_side must be None or an integer >= 32, got {value!r}")
    return int(value)


def mask_scale_for(orig_hw: tuple[int, int], max_mask_side: int | None) -> float:
    """The factor (<= 1) that brings the image's longer side down to ``max_mask_side``."""
    longest = max(orig_hw)
    if max_mask_side is None or longest <= max_mask_side:
        return 1.0
    return max_mask_side / longest


def _graph_inputs(samples: Sequence[Sample], threshold: float) -> dict[str, np.ndarray]:
    """The graph's inputs for a batch, plus ``threshold`` for split post-process graphs (see
    :mod:`instseg_core.inference.hpi`); a whole graph has no such input and ignores it."""
    return {**collate(samples), "threshold": np.array([threshold], np.float32)}


def _check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _orientation_groups(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of the samples split into landscape and portrait groups (non-empty ones)."""
    landscape = [i for i, s in enumerate(samples) if s.padded_hw[1] >= s.padded_hw[0]]
    portrait = [i for i, s in enumerate(samples) if s.padded_hw[1] < s.padded_hw[0]]
    return [g for g in (landscape, portrait) if g]


def _canvas_chunks(indices: list[int], samples: Sequence[Sample], max_mask_side: int | None) -> list[list[int]]:
    """Split one graph call into several so that the mask canvases of a call (images x the largest
    canvas among them) total at most one ``max_mask_side`` square: four 12 MP photos then cost
    what one does, while small photos still share a call. No limit: one call."""
    if max_mask_side is None:
        return [indices]
    budget = max_mask_side * max_mask_side
    calls: list[list[int]] = []
    current: list[int] = []
    largest = 0
    for i in indices:
        h, w = samples[i].orig_hw
        canvas = (h * samples[i].mask_scale) * (w * samples[i].mask_scale)
        if current and (len(current) + 1) * max(largest, canvas) > budget:
            calls.append(current)
            current, largest = [], 0
        current.append(i)
        largest = max(largest, canvas)
    return calls + [current] if current else calls


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
                 mask_format: str = "paddlex", max_mask_side: int | None = DEFAULT_MAX_MASK_SIDE,
                 use_hpip: bool = False, hpi_config: HPIConfig | dict[str, Any] | str | None = None,
                 **paddlex_kwargs: Any) -> InstanceSegPredictor:
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
        max_mask_side: the longest side at which the graph draws full-image masks (default 1333;
            None: the image's own size, as PaddleX). A larger image is presented to the graph as
            scaled down to it, then its boxes are scaled back and only the kept masks are
            upsampled (bilinear, cut at 0.5), bounding memory on 12-100 MP images.
        use_hpip: high-performance mode: the fastest backend for the model (ONNX Runtime or
            OpenVINO on CPU, TensorRT on GPU; see :mod:`instseg_core.inference.hpi`), falling back
            to Paddle Inference with a warning when none can run it.
        hpi_config: PaddleX's ``hpi_config`` (``backend``, ``backend_config``, ``auto_config``), a
            dict or its string form; used with ``use_hpip=True``.
        **paddlex_kwargs: PaddleX-only options (``pp_option``, ``engine``, ...) are accepted and
            ignored with a warning, so PaddleX code runs unchanged.
    """
    if not isinstance(use_hpip, bool):
        raise ValueError(f"use_hpip must be True or False, got {use_hpip!r}")
    hpi = parse_hpi_config(hpi_config) if use_hpip else None
    if hpi_config is not None and not use_hpip:
        log.warning("create_model(hpi_config=...) has no effect without use_hpip=True")
    for key in paddlex_kwargs:
        if key not in ("pp_option", "engine", "engine_config", "genai_config"):
            raise TypeError(f"create_model() got an unexpected keyword argument {key!r}")
        log.warning("create_model(%s=...) is a PaddleX option that instseg ignores", key)
    md = resolve_model_dir(model_name, model_dir)
    options = EngineOptions(device=device, cpu_threads=cpu_threads, enable_onednn=enable_onednn,
                            use_tensorrt=use_tensorrt, trt_precision=trt_precision,
                            trt_min_subgraph_size=int(md.config.get("min_subgraph_size", 3)))
    return InstanceSegPredictor(md, options, threshold=threshold, batch_size=batch_size, mask_format=mask_format,
                                max_mask_side=max_mask_side, hpi=hpi)
