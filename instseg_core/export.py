"""Export a (trained) network as a PaddleX-format inference dir.

Supported: PP-YOLOE_seg-S and Mask-RT-DETR-{S,M,L,X,H} (both with batch-capable graphs, declared
``batch_inference: true``), and SOLOv2 (one image per call, any input size, outputs ``bbox_num``,
``cate_label``, ``cate_score``, ``segm``; its ``inference.yml`` keeps the official keep-ratio
800x1333 preprocessing unless ``input_size`` is given), and the 8 Mask R-CNN / Cascade Mask
R-CNN models (one image per call, any input size; same ``inference.yml`` rule as SOLOv2, with
``PadStride`` 32, or none for the C4 ``MaskRCNN-ResNet50``).
``export_model(model_or_name, weights, output_dir)`` writes ``inference.json`` +
``inference.pdiparams`` (PIR, inputs ``im_shape`` / ``image`` / ``scale_factor``, outputs in the
sorted-key order, e.g. ``bbox``, ``bbox_num``, ``mask``) and ``inference.yml``. RepVGG blocks are fused
(``convert_to_deploy``) first, as PaddleDetection's ``tools/export_model.py`` does.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import paddle
import paddle.nn as nn
import yaml
from paddle.static import InputSpec

from instseg_core.models import family_of, get_spec

__all__ = ["export_model", "convert_to_deploy"]

# Detections at or below this score get no mask from PP-YOLOE_seg / Mask-RT-DETR exports (see
# export_model): the R-CNN models' own box threshold, far below any labelling threshold.
DEFAULT_SCORE_FLOOR = 0.05


def convert_to_deploy(model: nn.Layer) -> nn.Layer:
    """Call ``convert_to_deploy()`` on every sub-layer that has one (RepVGG blocks); returns model."""
    for layer in list(model.sublayers(include_self=True)):
        fn = getattr(layer, "convert_to_deploy", None)
        if callable(fn):
            fn()
    return model


class _ExportGraph(nn.Layer):
    """``forward(im_shape, image, scale_factor)``: the network's ``export_forward`` with the
    export's settings (see :class:`~instseg_core.modeling.base.InstanceSegModel`)."""

    def __init__(self, model: nn.Layer, input_hw: tuple[int, int] | None, score_floor: float | None):
        super().__init__()
        self.model = model
        self.input_hw = input_hw
        self.score_floor = score_floor

    def forward(self, im_shape: paddle.Tensor, image: paddle.Tensor,
                scale_factor: paddle.Tensor) -> dict[str, paddle.Tensor]:
        return self.model.export_forward(im_shape, image, scale_factor, input_hw=self.input_hw,
                                         score_floor=self.score_floor)


class _HeadGraph(nn.Layer):
    """``forward(image)``: the network up to its raw head outputs (``export_head``)."""

    def __init__(self, model: nn.Layer):
        super().__init__()
        self.model = model

    def forward(self, image: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        return self.model.export_head(image)


class _PostGraph(nn.Layer):
    """``forward(im_shape, scale_factor, threshold, raw0, ...)``: the post-process of the head's (up
    to four) raw outputs (``export_post``), with the whole graph's outputs less the detections
    scoring at or below ``threshold`` ([1]: the predictor's threshold, so no mask is drawn for a
    detection it drops). (``paddle.jit`` traces named parameters, not ``*args``.)"""

    def __init__(self, model: nn.Layer, input_hw: tuple[int, int] | None, score_floor: float | None):
        super().__init__()
        self.model = model
        self.input_hw = input_hw
        self.score_floor = score_floor

    def forward(self, im_shape: paddle.Tensor, scale_factor: paddle.Tensor, threshold: paddle.Tensor,
                raw0: paddle.Tensor, raw1: paddle.Tensor | None = None, raw2: paddle.Tensor | None = None,
                raw3: paddle.Tensor | None = None) -> dict[str, paddle.Tensor]:
        raw = tuple(t for t in (raw0, raw1, raw2, raw3) if t is not None)
        return self.model.export_post(im_shape, scale_factor, raw, input_hw=self.input_hw,
                                      score_floor=self.score_floor, keep_above=threshold)


# the split graphs' folder in an inference dir, and their file stems in it
HPI_DIR, HEAD_STEM, POST_STEM = "hpi", "head", "post"


def _save_split_graphs(model: nn.Layer, out: Path, input_hw: tuple[int, int], batch_dim: int,
                       score_floor: float | None) -> dict[str, Any]:
    """Save the head and post-process graphs under ``out/hpi/``; returns their ``inference.yml`` entry."""
    folder = out / HPI_DIR
    folder.mkdir(parents=True, exist_ok=True)
    head = _HeadGraph(model)
    head.eval()
    with paddle.no_grad():  # the raw outputs' shapes for the post graph's inputs
        probe = head(paddle.zeros([1, 3, *input_hw], dtype="float32"))
    names = list(model.raw_output_names)
    if len(probe) != len(names) or not 1 <= len(names) <= 4:
        raise RuntimeError(f"{type(model).__name__}.export_head gave {len(probe)} outputs for {len(names)} names")
    # one image per call, every shape static: the converter and the runtimes handle a fixed batch best
    # (ONNX Runtime rejects Mask-RT-DETR's head with a dynamic batch); the backends loop over a batch
    paddle.jit.save(head, str(folder / HEAD_STEM), input_spec=[InputSpec([1, 3, *input_hw], "float32", "image")])
    post = _PostGraph(model, input_hw, score_floor)
    post.eval()
    raw_specs = [InputSpec([batch_dim, *t.shape[1:]], "float32", n) for n, t in zip(names, probe)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found 'dict' in given outputs")
        warnings.filterwarnings("ignore", message="no variable in your model")  # the post-process has none
        paddle.jit.save(post, str(folder / POST_STEM),
                        input_spec=[InputSpec([batch_dim, 2], "float32", "im_shape"),
                                    InputSpec([batch_dim, 2], "float32", "scale_factor"),
                                    InputSpec([1], "float32", "threshold"), *raw_specs])
    return {"head": f"{HPI_DIR}/{HEAD_STEM}", "post": f"{HPI_DIR}/{POST_STEM}", "raw_outputs": names,
            "input_shape": [1, 3, *input_hw]}


# Keys a weights file may omit: constants the network sets itself (PP-YOLOE's DFL projection 0..16).
OPTIONAL_KEYS = frozenset({"yolo_head.proj_conv.weight"})


def _load_weights(model: nn.Layer, weights: Any, strict: bool) -> None:
    """Load ``weights`` (None, a state dict, or a ``.pdparams`` path/URL/``s3://`` URI, read by the
    restricted unpickler, never ``paddle.load``) into ``model``. Missing or shape-mismatched keys
    are an error naming the first few unless ``strict=False`` (then a warning): an export with
    weights that fit nothing would otherwise give a full inference dir of random weights."""
    from instseg_core.modeling.weights import WeightsError, load_weights, read_pdparams

    if weights is None:
        return
    if isinstance(weights, (str, os.PathLike, bytes)):
        weights = read_pdparams(weights)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be None, a state dict or a .pdparams path, got {type(weights)!r}")
    arrays = {k: (v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v)) for k, v in weights.items()}
    report = load_weights(model, arrays, strict_shapes=False)
    missing = [k for k in report.missing if k not in OPTIONAL_KEYS]
    if not (missing or report.skipped):
        return
    total = len(model.state_dict())
    message = (f"the weights do not fit the network: {len(missing)} of its {total} keys missing"
               + (f" (e.g. {', '.join(missing[:4])})" if missing else "")
               + (f", {len(report.skipped)} with another shape (e.g. {', '.join(report.skipped[:4])})"
                  if report.skipped else "")
               + f"; {len(report.unexpected)} keys of the file unused"
               + (f" (e.g. {', '.join(report.unexpected[:4])})" if report.unexpected else ""))
    if strict:
        raise WeightsError(f"{message}. Wrong model name or num_classes? To export anyway, pass strict=False "
                           f"(-o Export.strict=False)")
    warnings.warn(f"{message}; exporting anyway (strict=False)")


def preprocess_for_size(ops: list[dict], input_size: int | None) -> list[dict]:
    """A copy of a ``Preprocess`` list resized for ``input_size`` (keep-ratio models: [s, 5s/3])."""
    ops = copy.deepcopy(ops)
    if input_size is not None:
        for op in ops:
            if op["type"] == "Resize":
                keep = op.get("keep_ratio", False)
                op["target_size"] = [input_size, int(input_size * 5 / 3)] if keep else [input_size, input_size]
    return ops


def write_inference_yml(output_dir: str | os.PathLike, model_name: str, labels: list, *, draw_threshold: float = 0.5,
                        input_size: int | None = None, with_model_name: bool = True,
                        batch_inference: bool | None = None, score_floor: float | None = None,
                        split_graphs: dict[str, Any] | None = None) -> Path:
    """Write ``inference.yml`` with PaddleX's fields, plus ``batch_inference`` when given (true: the
    graph takes a batch in one call; false: one image per call) and ``score_floor`` (the graph
    drops detections scoring at or below it before drawing masks) and ``split_graphs`` (the
    ``hpi/`` head and post-process graphs, see :func:`export_model`); returns its path."""
    spec = get_spec(model_name)
    family = family_of(model_name)
    cfg: dict = {"mode": "paddle", "draw_threshold": float(draw_threshold), "metric": "COCO",
                 "use_dynamic_shape": False}
    if with_model_name:
        cfg["Global"] = {"model_name": model_name}
    cfg.update(
        arch=family.arch,
        min_subgraph_size=family.export.min_subgraph_size,
        mask=True,
        Preprocess=preprocess_for_size(spec.preprocess, input_size),
        label_list=[str(label) for label in labels],
    )
    if batch_inference is not None:
        cfg["batch_inference"] = bool(batch_inference)
    if score_floor is not None:
        cfg["score_floor"] = float(score_floor)
    if split_graphs is not None:
        cfg["split_graphs"] = split_graphs
    path = Path(output_dir) / "inference.yml"
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    return path


def _model_name_of(model: nn.Layer) -> str:
    name = getattr(model, "model_name", None)
    if name:
        return str(name)
    raise ValueError(f"cannot tell the model name of {type(model).__name__}; pass the name instead")


def export_model(model_or_name, weights, output_dir, *, input_size: int | None = None, labels=None,
                 draw_threshold: float = 0.5, num_classes: int | None = None, arch: dict | None = None,
                 score_floor: float | None = DEFAULT_SCORE_FLOOR, strict: bool = True,
                 split_graphs: bool = True) -> Path:
    """Export ``model_or_name`` (an official name or a built network) with ``weights``.

    ``weights``: None (keep the model's), a state dict, or a ``.pdparams`` path, URL or ``s3://``
    URI (read without unpickling code). Keys missing from them or of another shape are an error
    (:class:`~instseg_core.modeling.weights.WeightsError` listing some) unless ``strict=False``. ``num_classes``
    sizes a network built by name (default: ``len(labels)``, else the official label count) and ``arch``
    passes architecture overrides to :func:`~instseg_core.modeling.build_model`. The model is
    deep-copied before fusing, so a passed-in network is left in its training form.
    ``input_size``: the fixed square input of PP-YOLOE_seg / Mask-RT-DETR (default 640); for
    SOLOv2 and the R-CNN models (dynamic input) the short side of the ``inference.yml`` Resize (default: the official
    [800, 1333]). ``score_floor`` (PP-YOLOE_seg, Mask-RT-DETR): detections scoring at or below it are
    dropped inside the graph before any mask is drawn, so the graph's memory follows what a user
    keeps (PP-YOLOE_seg otherwise draws up to 300 candidates above 0.01, Mask-RT-DETR always 100);
    None keeps the model's own rule. It is written to ``inference.yml`` and the predictor warns
    when asked for a lower threshold. The R-CNN models already drop boxes at 0.05 (their NMS) and
    SOLOv2 at its matrix-NMS update threshold. ``split_graphs`` (PP-YOLOE_seg, Mask-RT-DETR): also
    save the network as two graphs under ``hpi/`` (the network up to its raw head outputs, and their
    post-process) for the high-performance backends, which run the first; about doubles the dir's
    size. Returns ``output_dir``.
    """
    from instseg_core.modeling.build import build_model

    size = int(input_size) if input_size is not None else None
    if size is not None and (size < 32 or size % 32):
        raise ValueError(f"input_size must be a positive multiple of 32, got {input_size}")
    if isinstance(model_or_name, str):
        name = model_or_name
        spec = get_spec(name)
        if num_classes is None:
            num_classes = len(labels) if labels is not None else len(spec.labels)
        model = build_model(name, num_classes=num_classes, **(arch or {}))
    else:
        name = _model_name_of(model_or_name)
        spec = get_spec(name)
        model = copy.deepcopy(model_or_name)
    _load_weights(model, weights, strict)
    model.eval()
    convert_to_deploy(model)
    num_classes = int(model.num_classes)

    layout = family_of(name).export
    batch_dim = layout.graph_batch  # the graph's batch dimension (-1: any)
    if layout.square_input:
        # the graph's H = W and the yml Resize target (default 640)
        square = size or 640
        input_hw: tuple[int, int] | None = (square, square)
        image_spec = InputSpec([batch_dim, 3, square, square], "float32", "image")
        resize_size = square
    else:
        # keep-ratio resize: the graph takes any size, the yml Resize short side (None: official 800)
        input_hw = None
        image_spec = InputSpec([batch_dim, 3, -1, -1], "float32", "image")
        resize_size = size
    if not layout.score_floor:
        score_floor = None  # the family's graph drops low scores by its own rule (see above)
    net = _ExportGraph(model, input_hw, score_floor)
    net.eval()

    if labels is None:
        labels = list(spec.labels[:num_classes]) + [f"class{i}" for i in range(len(spec.labels), num_classes)]
    elif len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for a model with {num_classes} classes")

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [InputSpec([batch_dim, 2], "float32", "im_shape"), image_spec,
             InputSpec([batch_dim, 2], "float32", "scale_factor")]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found 'dict' in given outputs")
        paddle.jit.save(net, str(out / "inference"), input_spec=specs)

    split = None
    if split_graphs and model.raw_output_names and input_hw is not None:
        split = _save_split_graphs(model, out, input_hw, batch_dim, score_floor)
    write_inference_yml(out, name, labels, draw_threshold=draw_threshold, input_size=resize_size,
                        batch_inference=layout.batch_inference, score_floor=score_floor, split_graphs=split)
    return out
