"""COCO evaluation of an in-memory (dygraph) model over a dataset: predict, encode RLE, score."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from ..masks import encode_rle
from .data import CocoInstanceDataset, TrainSample, make_eval_transform

log = logging.getLogger("instseg.train")


@paddle.no_grad()
def predict_coco_results(model: nn.Layer, dataset: CocoInstanceDataset, *, input_size: int,
                         mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                         score_threshold: float = 0.0) -> List[Dict[str, Any]]:
    """Run ``model`` (eval mode, one image at a time) over ``dataset``; COCO result dicts with RLE masks.

    Labels map back to the dataset's category ids; detections with score <= ``score_threshold``
    are dropped (0 keeps every real detection and drops the models' zero-score padding rows).
    """
    was_training = model.training
    model.eval()
    transform = make_eval_transform(input_size, mean, std)
    results: List[Dict[str, Any]] = []
    try:
        for i in range(len(dataset)):
            rgb = dataset.read_image(i)
            h, w = rgb.shape[:2]
            empty = np.zeros((0, h, w), np.uint8)
            s = transform(TrainSample(rgb, np.zeros(0, np.int64), np.zeros((0, 4), np.float32), empty,
                                      orig_hw=(h, w)))
            out = model({"image": paddle.to_tensor(s.image[None]),
                         "im_shape": paddle.to_tensor([[float(input_size), float(input_size)]]),
                         "scale_factor": paddle.to_tensor([list(s.scale_factor)], dtype="float32")})
            bbox = out["bbox"].numpy()
            masks = out["mask"].numpy()
            keep = bbox[:, 1] > score_threshold
            if not keep.any():
                continue
            bbox, raw = bbox[keep], masks[keep] > 0.5
            masks = np.zeros((len(raw), h, w), bool)  # the graph's size may differ by a pixel (rounding)
            mh, mw = min(h, raw.shape[1]), min(w, raw.shape[2])
            masks[:, :mh, :mw] = raw[:, :mh, :mw]
            image_id = dataset.images[i]["id"]
            for det, rle in zip(bbox, encode_rle(masks)):
                label = int(det[0])
                if not 0 <= label < dataset.num_classes:
                    continue
                x1, y1, x2, y2 = (float(v) for v in det[2:6])
                results.append({"image_id": image_id, "category_id": dataset.category_ids[label],
                                "score": float(det[1]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "segmentation": {"size": [h, w], "counts": rle["counts"]}})
    finally:
        model.train(was_training)
    return results


def evaluate_model(model: nn.Layer, dataset: CocoInstanceDataset, *, input_size: int,
                   mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)
                   ) -> Dict[str, Dict[str, float]]:
    """Mask and box COCO stats of ``model`` on ``dataset`` (see :func:`instseg_core.evaluation.evaluate_coco`)."""
    from ..evaluation import evaluate_coco

    results = predict_coco_results(model, dataset, input_size=input_size, mean=mean, std=std)
    log.info("evaluation: %d detections on %d images", len(results), len(dataset))
    return evaluate_coco(dataset.ann_file, results, iou_types=("segm", "bbox"))
