"""COCO instance-segmentation training data: samples with per-instance targets, transforms, batches.

A training batch is ``(inputs, targets)``: ``inputs = {"image": [B,3,H,W] float32, "im_shape": [B,2],
"scale_factor": [B,2]}`` and ``targets`` a list of B dicts of tensors::

    labels  int64   [n]         contiguous class index (0..num_classes-1)
    boxes   float32 [n, 4]      x1, y1, x2, y2 in pixels of the network input
    masks   float32 [n, H, W]   0/1 at the network input resolution

Every model's training forward is ``model(inputs, targets) -> {"loss": total, <named terms>...}``.
Crowd annotations are left out of the targets (they are ignored regions, not objects).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from instseg_core.datasets.coco import segmentation_mask


@dataclass
class TrainSample:
    """One image and its instances; ``image`` is RGB uint8 HWC until ``normalize`` makes it float CHW."""

    image: np.ndarray
    labels: np.ndarray  # int64 [n]
    boxes: np.ndarray  # float32 [n, 4] xyxy
    masks: np.ndarray  # uint8 [n, H, W]
    image_id: int = 0
    file_name: str = ""
    orig_hw: tuple[int, int] = (0, 0)
    scale_factor: tuple[float, float] = (1.0, 1.0)  # (sy, sx) from the original image


class CocoInstanceDataset:
    """Images and instance targets of one COCO annotation file.

    ``category_ids`` fixes the class order (default: the file's categories sorted by id), so that
    index ``i`` is the i-th entry of the model's ``label_list``. Annotations whose segmentation does
    not decode are skipped; images without any usable instance are kept (they teach background).
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike,
                 category_ids: Sequence[int] | None = None, image_ids: Sequence[int] | None = None):
        self.ann_file = str(ann_file)
        self.image_dir = Path(image_dir)
        with open(self.ann_file, encoding="utf-8") as f:
            coco = json.load(f)
        cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
        self.category_ids = list(category_ids) if category_ids is not None else [c["id"] for c in cats]
        names = {c["id"]: c.get("name", str(c["id"])) for c in cats}
        self.label_list = [names.get(cid, str(cid)) for cid in self.category_ids]
        self.cat_to_label = {cid: i for i, cid in enumerate(self.category_ids)}
        images = {im["id"]: im for im in coco.get("images", [])}
        order = list(image_ids) if image_ids is not None else sorted(images)
        self.images = [images[i] for i in order]
        self.anns: dict[int, list[dict]] = {i: [] for i in order}
        for ann in coco.get("annotations", []):
            if ann.get("image_id") in self.anns:
                self.anns[ann["image_id"]].append(ann)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, index: int) -> np.ndarray:
        """RGB uint8 HWC pixels of image ``index``; raises ValueError naming an unreadable file."""
        path = self.image_dir / self.images[index]["file_name"]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"training image {str(path)!r} cannot be read (missing or not an image)")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def __getitem__(self, index: int) -> TrainSample:
        info = self.images[index]
        image = self.read_image(index)
        h, w = image.shape[:2]
        labels, boxes, masks = [], [], []
        for ann in self.anns[info["id"]]:
            if ann.get("iscrowd", 0) or ann.get("category_id") not in self.cat_to_label:
                continue
            mask = segmentation_mask(ann.get("segmentation"), h, w)
            if mask is None or not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            labels.append(self.cat_to_label[ann["category_id"]])
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            masks.append(mask.astype(np.uint8))
        return TrainSample(
            image=image,
            labels=np.asarray(labels, np.int64),
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            masks=np.stack(masks) if masks else np.zeros((0, h, w), np.uint8),
            image_id=int(info["id"]), file_name=info["file_name"], orig_hw=(h, w))


# ---- transforms: each takes and returns a TrainSample (and a random.Random for the random ones) ----

def random_flip(sample: TrainSample, rng: random.Random, prob: float = 0.5) -> TrainSample:
    """Horizontal flip of image, boxes and masks with probability ``prob``."""
    if rng.random() >= prob:
        return sample
    w = sample.image.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, [0, 2]] = w - sample.boxes[:, [2, 0]]
    return TrainSample(np.ascontiguousarray(sample.image[:, ::-1]), sample.labels, boxes,
                       np.ascontiguousarray(sample.masks[:, :, ::-1]), sample.image_id, sample.file_name,
                       sample.orig_hw, sample.scale_factor)


def resize(sample: TrainSample, size_hw: tuple[int, int], interp: int = cv2.INTER_CUBIC) -> TrainSample:
    """Resize to exactly ``size_hw`` (no aspect ratio kept, as DETR/YOLOE test-time resize does).

    Boxes scale with the image; masks are resized with nearest neighbour so they stay 0/1, and
    instances whose mask vanishes are dropped.
    """
    h, w = sample.image.shape[:2]
    th, tw = int(size_hw[0]), int(size_hw[1])
    sy, sx = th / h, tw / w
    image = cv2.resize(sample.image, (tw, th), interpolation=interp)
    boxes = sample.boxes * np.array([sx, sy, sx, sy], np.float32)
    if len(sample.masks):
        masks = np.stack([cv2.resize(m, (tw, th), interpolation=cv2.INTER_NEAREST) for m in sample.masks])
    else:
        masks = np.zeros((0, th, tw), np.uint8)
    keep = masks.reshape(len(masks), -1).any(axis=1) if len(masks) else np.zeros(0, bool)
    return TrainSample(image, sample.labels[keep], boxes[keep], masks[keep], sample.image_id,
                       sample.file_name, sample.orig_hw,
                       (sample.scale_factor[0] * sy, sample.scale_factor[1] * sx))


def keep_ratio_size(hw: tuple[int, int], short: int, max_size: int) -> tuple[int, int]:
    """Output size of a keep-ratio resize: the short side to ``short`` unless the long side would
    exceed ``max_size`` (PaddleDetection's ``Resize(keep_ratio=True)`` scale, rounded)."""
    h, w = hw
    scale = min(short / min(h, w), max_size / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def random_resize(sample: TrainSample, rng: random.Random, sizes: Sequence[int]) -> TrainSample:
    """Multi-scale training: resize to a square side drawn from ``sizes``."""
    s = int(rng.choice(list(sizes)))
    return resize(sample, (s, s))


def normalize(sample: TrainSample, mean: Sequence[float] = (0.0, 0.0, 0.0),
              std: Sequence[float] = (1.0, 1.0, 1.0)) -> TrainSample:
    """uint8 HWC RGB -> float32 CHW, ``(x / 255 - mean) / std`` (the families' test-time arithmetic)."""
    x = sample.image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return TrainSample(np.ascontiguousarray(x.transpose(2, 0, 1)), sample.labels, sample.boxes,
                       sample.masks, sample.image_id, sample.file_name, sample.orig_hw, sample.scale_factor)


def collate(samples: Sequence[TrainSample], pad_stride: int = 32):
    """Stack normalised samples into ``(inputs, targets)`` of paddle tensors (see the module doc).

    Images of different sizes are zero-padded at the bottom/right to a common size that is a
    multiple of ``pad_stride``; masks are padded the same way.
    """
    import paddle

    hs = [s.image.shape[1] for s in samples]
    ws = [s.image.shape[2] for s in samples]
    H = int(np.ceil(max(hs) / pad_stride) * pad_stride)
    W = int(np.ceil(max(ws) / pad_stride) * pad_stride)
    batch = np.zeros((len(samples), 3, H, W), np.float32)
    targets = []
    for i, s in enumerate(samples):
        h, w = s.image.shape[1:]
        batch[i, :, :h, :w] = s.image
        masks = np.zeros((len(s.masks), H, W), np.float32)
        masks[:, :h, :w] = s.masks
        targets.append({"labels": paddle.to_tensor(s.labels.astype(np.int64)),
                        "boxes": paddle.to_tensor(s.boxes.astype(np.float32)),
                        "masks": paddle.to_tensor(masks)})
    inputs = {
        "image": paddle.to_tensor(batch),
        "im_shape": paddle.to_tensor(np.array([[h, w] for h, w in zip(hs, ws)], np.float32)),
        "scale_factor": paddle.to_tensor(np.array([s.scale_factor for s in samples], np.float32)),
    }
    return inputs, targets


def make_train_transform(size: int = 640, multiscale: Sequence[int] = (), flip: bool = True,
                         mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                         keep_ratio_max: int = 0) -> Callable[[TrainSample, random.Random], TrainSample]:
    """The training transform: flip, (multi-scale) resize, normalise.

    Square resize to ``size`` (or a side drawn from ``multiscale``) for DETR/YOLOE; with
    ``keep_ratio_max`` > 0 a keep-ratio resize whose short side is ``size`` (or drawn from
    ``multiscale``) and long side at most ``keep_ratio_max`` (R-CNN, SOLOv2).
    """
    def transform(sample: TrainSample, rng: random.Random) -> TrainSample:
        if flip:
            sample = random_flip(sample, rng)
        if keep_ratio_max > 0:
            short = int(rng.choice(list(multiscale))) if multiscale else size
            sample = resize(sample, keep_ratio_size(sample.image.shape[:2], short, keep_ratio_max))
        else:
            sample = random_resize(sample, rng, multiscale) if multiscale else resize(sample, (size, size))
        return normalize(sample, mean, std)
    return transform


def make_eval_transform(size: int = 640, mean: Sequence[float] = (0.0, 0.0, 0.0),
                        std: Sequence[float] = (1.0, 1.0, 1.0)) -> Callable[[TrainSample, Any], TrainSample]:
    """Deterministic resize + normalise (the exported model's preprocessing)."""
    def transform(sample: TrainSample, rng: Any = None) -> TrainSample:
        return normalize(resize(sample, (size, size)), mean, std)
    return transform


def load_batch(dataset: CocoInstanceDataset, indices: Sequence[int], size: int = 640, seed: int = 0,
               train: bool = True):
    """``(inputs, targets)`` for ``dataset[indices]``: a convenience for tests and small scripts."""
    rng = random.Random(seed)
    tf = make_train_transform(size) if train else make_eval_transform(size)
    return collate([tf(dataset[i], rng) for i in indices])
