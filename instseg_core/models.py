"""The 15 instance-segmentation models: name -> everything known about it.

A plain dict of frozen dataclasses: no registry machinery. What a model shares with its family
(network, recipe, export, post-process) is its family's record (:mod:`instseg_core.families`,
:func:`family_of`). Preprocessing defaults are the ops an official ``inference.yml`` carries
(PaddleX 3.x / PaddleDetection TestReader); the predictor always prefers the ``inference.yml`` of
the model dir it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from instseg_core.families import (
    CASCADE_RCNN,
    FAMILIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MASK_RTDETR,
    MASKRCNN,
    PPYOLOE_SEG,
    SOLOV2,
    Family,
)

INFERENCE_URL = "https://paddle-model-ecology.bj.bcebos.com/paddlex/official_inference_model/paddle3.0.0/{name}_infer.tar"
PRETRAINED_URL = "https://paddle-model-ecology.bj.bcebos.com/paddlex/official_pretrained_model/{name}_pretrained.pdparams"

COCO80_LABELS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def _detr_preprocess(size: int = 640) -> list[dict[str, Any]]:
    return [
        {"type": "Resize", "target_size": [size, size], "keep_ratio": False, "interp": 2},
        {"type": "NormalizeImage", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "norm_type": "none"},
        {"type": "Permute"},
    ]


def _rcnn_preprocess(stride: int) -> list[dict[str, Any]]:
    return [
        {"type": "Resize", "target_size": [800, 1333], "keep_ratio": True, "interp": 2},
        {"type": "NormalizeImage", "is_scale": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        {"type": "Permute"},
        {"type": "PadStride", "stride": stride},
    ]


def _solov2_preprocess() -> list[dict[str, Any]]:
    # SOLOv2 normalises *before* resizing (its TestReader order); interp 1 = bilinear.
    return [
        {"type": "NormalizeImage", "is_scale": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        {"type": "Resize", "target_size": [800, 1333], "keep_ratio": True, "interp": 1},
        {"type": "Permute"},
        {"type": "PadStride", "stride": 32},
    ]


@dataclass(frozen=True)
class ModelSpec:
    """Everything known about one official model name."""

    name: str
    family: str  # a key of instseg_core.families.FAMILIES
    ppdet_config: str
    mask_ap: float
    preprocess: list[dict[str, Any]] = field(hash=False)
    batch1_only: bool = False  # PaddleX runs these one image at a time
    train_lr: float = 0.01
    train_batch_size: int = 2
    labels: tuple[str, ...] = COCO80_LABELS
    draw_threshold: float = 0.5

    @property
    def arch(self) -> str:
        """The ``arch`` of the model's ``inference.yml`` (its family's)."""
        return FAMILIES[self.family].arch

    @property
    def inference_url(self) -> str:
        """Where the official inference dir (a tar) is downloaded from."""
        return INFERENCE_URL.format(name=self.name)

    @property
    def pretrained_url(self) -> str:
        """Where the official COCO-trained weights are downloaded from."""
        return PRETRAINED_URL.format(name=self.name)


def _specs() -> dict[str, ModelSpec]:
    specs = [
        ModelSpec("Mask-RT-DETR-S", MASK_RTDETR, "mask_rtdetr/mask_rtdetr_hgnetv2_s_6x_coco.yml", 41.0, _detr_preprocess(), train_lr=5e-5),
        ModelSpec("Mask-RT-DETR-M", MASK_RTDETR, "mask_rtdetr/mask_rtdetr_hgnetv2_m_6x_coco.yml", 42.7, _detr_preprocess(), train_lr=5e-5),
        ModelSpec("Mask-RT-DETR-L", MASK_RTDETR, "mask_rtdetr/mask_rtdetr_hgnetv2_l_6x_coco.yml", 45.7, _detr_preprocess(), train_lr=1e-4),
        ModelSpec("Mask-RT-DETR-X", MASK_RTDETR, "mask_rtdetr/mask_rtdetr_hgnetv2_x_6x_coco.yml", 47.5, _detr_preprocess(), train_lr=5e-5),
        ModelSpec("Mask-RT-DETR-H", MASK_RTDETR, "mask_rtdetr/mask_rtdetr_hgnetv2_h_6x_coco.yml", 50.6, _detr_preprocess(), train_lr=5e-5),
        ModelSpec("MaskRCNN-ResNet50", MASKRCNN, "mask_rcnn/mask_rcnn_r50_1x_coco.yml", 32.8, _rcnn_preprocess(-1)),
        ModelSpec("MaskRCNN-ResNet50-FPN", MASKRCNN, "mask_rcnn/mask_rcnn_r50_fpn_1x_coco.yml", 35.6, _rcnn_preprocess(32)),
        ModelSpec("MaskRCNN-ResNet50-vd-FPN", MASKRCNN, "mask_rcnn/mask_rcnn_r50_vd_fpn_1x_coco.yml", 36.4, _rcnn_preprocess(32)),
        ModelSpec("MaskRCNN-ResNet101-FPN", MASKRCNN, "mask_rcnn/mask_rcnn_r101_fpn_1x_coco.yml", 36.6, _rcnn_preprocess(32)),
        ModelSpec("MaskRCNN-ResNet101-vd-FPN", MASKRCNN, "mask_rcnn/mask_rcnn_r101_vd_fpn_1x_coco.yml", 38.1, _rcnn_preprocess(32)),
        ModelSpec("MaskRCNN-ResNeXt101-vd-FPN", MASKRCNN, "mask_rcnn/mask_rcnn_x101_vd_64x4d_fpn_1x_coco.yml", 39.5, _rcnn_preprocess(32)),
        ModelSpec("Cascade-MaskRCNN-ResNet50-FPN", CASCADE_RCNN, "cascade_rcnn/cascade_mask_rcnn_r50_fpn_1x_coco.yml", 36.3, _rcnn_preprocess(32), batch1_only=True, train_batch_size=1),
        ModelSpec("Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN", CASCADE_RCNN, "cascade_rcnn/cascade_mask_rcnn_r50_vd_fpn_ssld_1x_coco.yml", 39.1, _rcnn_preprocess(32), batch1_only=True, train_batch_size=1),
        ModelSpec("PP-YOLOE_seg-S", PPYOLOE_SEG, "ppyoloe_seg/ppyoloe_seg_s_80e_coco.yml", 32.5, _detr_preprocess(), batch1_only=True, train_lr=1e-3, train_batch_size=8),
        ModelSpec("SOLOv2", SOLOV2, "solov2/solov2_r50_fpn_1x_coco.yml", 35.5, _solov2_preprocess(), batch1_only=True),
    ]
    return {s.name: s for s in specs}


MODEL_SPECS: dict[str, ModelSpec] = _specs()
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


def get_spec(name: str) -> ModelSpec:
    """The spec of an official model name; a clear error listing the valid names otherwise."""
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; expected one of: {', '.join(MODEL_NAMES)}") from None


def family_of(name: str) -> Family:
    """The family record of an official model name; a clear error listing the valid names otherwise."""
    return FAMILIES[get_spec(name).family]
