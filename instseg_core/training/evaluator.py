"""COCO evaluation of an in-memory (dygraph) model over a dataset: predict, encode RLE, score.

Two input paths, both ending in the same per-image :class:`~instseg_core.structures.Instances`
and the same COCO-results code:

* ``input_size`` (+ ``mean``/``std``): the training recipes' square resize, for the trainable
  PP-YOLOE_seg / Mask-RT-DETR families (the transform they are trained and validated with);
* ``preprocess``: an ``inference.yml`` ``Preprocess`` list run by the predictor's own
  :class:`~instseg_core.inference.preprocess.Preprocessor` and ``collate``, and the predictor's
  post-processing (:mod:`instseg_core.inference.postprocess`), so the dygraph model is evaluated on
  exactly what its exported predictor sees (R-CNN and SOLOv2: keep-ratio resize, pad to a stride).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import paddle
import paddle.nn as nn

from instseg_core.structures import Instances
from instseg_core.training.data import CocoInstanceDataset, TrainSample, make_eval_transform

log = logging.getLogger("instseg.train")

ImagePredictor = Callable[[np.ndarray], Instances]


def _square_predictor(model: nn.Layer, input_size: int, mean: Sequence[float], std: Sequence[float],
                      score_threshold: float) -> ImagePredictor:
    """The recipe families' path (unchanged): square resize, raw boxes, masks cropped/padded."""
    transform = make_eval_transform(input_size, mean, std)

    def predict(rgb: np.ndarray) -> Instances:
        h, w = rgb.shape[:2]
        empty = np.zeros((0, h, w), np.uint8)
        s = transform(TrainSample(rgb, np.zeros(0, np.int64), np.zeros((0, 4), np.float32), empty,
                                  orig_hw=(h, w)))
        out = model({"image": paddle.to_tensor(s.image[None]),
                     "im_shape": paddle.to_tensor([[float(input_size), float(input_size)]]),
                     "scale_factor": paddle.to_tensor([list(s.scale_factor)], dtype="float32")})
        bbox = out["bbox"].numpy()
        keep = bbox[:, 1] > score_threshold
        bbox, raw = bbox[keep], out["mask"].numpy()[keep] > 0.5
        masks = np.zeros((len(raw), h, w), bool)  # the graph's size may differ by a pixel (rounding)
        mh, mw = min(h, raw.shape[1]), min(w, raw.shape[2])
        masks[:, :mh, :mw] = raw[:, :mh, :mw]
        return Instances(bbox[:, 2:6], bbox[:, 1], bbox[:, 0].astype(np.int64), masks, (h, w))

    return predict


def _preprocess_predictor(model: nn.Layer, preprocess: Sequence[dict[str, Any]],
                          score_threshold: float) -> ImagePredictor:
    """The exported predictor's pre- and post-processing around the dygraph ``model`` (batch 1)."""
    from instseg_core.inference.preprocess import Preprocessor, collate
    from instseg_core.models import family_of

    preprocessor = Preprocessor(preprocess, source="evaluation preprocess")
    postprocess = family_of(model.model_name).postprocess  # its family's, as its exported predictor runs

    def predict(rgb: np.ndarray) -> Instances:
        # The predictor takes BGR (as cv2 decodes files); the swap back is exact.
        sample = preprocessor(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        out = model({k: paddle.to_tensor(v) for k, v in collate([sample]).items()})
        # the graph's outputs are the sorted keys of this dict; the postprocess reads them in that order
        outputs = [out[k].numpy() for k in sorted(out)]
        # strict: score > threshold for SOLOv2 too, so threshold 0 drops its zero-score padding row
        return postprocess(outputs, [sample.orig_hw], score_threshold, strict=True)[0]

    return predict


def image_predictor(model: nn.Layer, *, input_size: int | None = None,
                    mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                    preprocess: Sequence[dict[str, Any]] | None = None,
                    score_threshold: float = 0.0) -> ImagePredictor:
    """``f(rgb uint8 HWC) -> Instances`` (original-image pixels) running ``model``, which must be in
    eval mode, on one image: what :func:`predict_coco_results` scores.

    Give either ``preprocess`` (an ``inference.yml`` ``Preprocess`` op list, e.g.
    ``preprocess_for_size(get_spec(name).preprocess, size)``: the predictor's pre- and
    post-processing, for any family) or ``input_size`` with ``mean``/``std`` (the training recipes'
    square resize). Detections with score <= ``score_threshold`` are dropped (0 keeps every real
    detection and drops the models' zero-score padding rows).
    """
    if (preprocess is None) == (input_size is None):
        raise ValueError("give exactly one of input_size (square resize) or preprocess (an op list)")
    if preprocess is not None:
        return _preprocess_predictor(model, preprocess, score_threshold)
    return _square_predictor(model, int(input_size), mean, std, score_threshold)


def coco_results(inst: Instances, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO result dicts (xywh box, RLE mask) of one image's detections; class ``i`` is
    ``category_ids[i]``, detections of other classes are left out."""
    results: list[dict[str, Any]] = []
    if len(inst) == 0:
        return results
    h, w = inst.image_size
    for box, score, label, rle in zip(inst.boxes, inst.scores, inst.class_ids, inst.rle_masks()):
        label = int(label)
        if not 0 <= label < len(category_ids):
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append({"image_id": image_id, "category_id": category_ids[label], "score": float(score),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "segmentation": {"size": [h, w], "counts": rle["counts"]}})
    return results


@paddle.no_grad()
def predict_coco_results(model: nn.Layer, dataset: CocoInstanceDataset, *, input_size: int | None = None,
                         mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                         preprocess: Sequence[dict[str, Any]] | None = None,
                         score_threshold: float = 0.0) -> list[dict[str, Any]]:
    """Run ``model`` (eval mode, one image at a time) over ``dataset``; COCO result dicts with RLE masks.

    Inputs as :func:`image_predictor` (``input_size`` + ``mean``/``std``, or ``preprocess``).
    Labels map back to the dataset's category ids; detections with score <= ``score_threshold``
    are dropped (0 keeps every real detection and drops the models' zero-score padding rows).
    """
    was_training = model.training
    model.eval()
    predict = image_predictor(model, input_size=input_size, mean=mean, std=std, preprocess=preprocess,
                              score_threshold=score_threshold)
    results: list[dict[str, Any]] = []
    try:
        for i in range(len(dataset)):
            inst = predict(dataset.read_image(i))
            results.extend(coco_results(inst, dataset.images[i]["id"], dataset.category_ids))
    finally:
        model.train(was_training)
    return results


def evaluate_model(model: nn.Layer, dataset: CocoInstanceDataset, *, input_size: int | None = None,
                   mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                   preprocess: Sequence[dict[str, Any]] | None = None) -> dict[str, dict[str, float]]:
    """Mask and box COCO stats of ``model`` on ``dataset`` (see :func:`instseg_core.evaluation.evaluate_coco`);
    inputs as :func:`image_predictor`."""
    from instseg_core.evaluation import evaluate_coco

    results = predict_coco_results(model, dataset, input_size=input_size, mean=mean, std=std,
                                   preprocess=preprocess)
    log.info("evaluation: %d detections on %d images", len(results), len(dataset))
    return evaluate_coco(dataset.ann_file, results, iou_types=("segm", "bbox"))
