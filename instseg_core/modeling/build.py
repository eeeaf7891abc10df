"""Build a (randomly initialised) network by its official PaddleX name; all 15 are implemented."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import paddle.nn as nn

from ..models import MODEL_NAMES
from .mask_rcnn import MASK_RCNN_NAMES


def _no_arch(name: str, arch: dict) -> None:
    if arch:
        raise ValueError(f"{name} takes no architecture overrides, got {sorted(arch)}")


def _ppyoloe_seg_s(num_classes: int, **arch) -> nn.Layer:
    from .ppyoloe_seg import ppyoloe_seg_s

    return ppyoloe_seg_s(num_classes=num_classes, **arch)


def _mask_rtdetr(size: str) -> Callable[..., nn.Layer]:
    def build(num_classes: int, **arch) -> nn.Layer:
        from .mask_rtdetr import mask_rtdetr

        _no_arch(f"Mask-RT-DETR-{size}", arch)
        return mask_rtdetr(size, num_classes=num_classes)

    return build


def _mask_rcnn(name: str) -> Callable[..., nn.Layer]:
    def build(num_classes: int, **arch) -> nn.Layer:
        from .mask_rcnn import mask_rcnn

        _no_arch(name, arch)
        return mask_rcnn(name, num_classes=num_classes)

    return build


SOLOV2_ARCH_KEYS = ("fpn_channels", "seg_feat_channels", "stacked_convs", "num_grids", "kernel_out_channels",
                    "mask_mid_channels")


def _solov2(num_classes: int, **arch) -> nn.Layer:
    from .solov2 import solov2

    unknown = sorted(set(arch) - set(SOLOV2_ARCH_KEYS))
    if unknown:
        raise ValueError(f"SOLOv2 takes the architecture overrides {', '.join(SOLOV2_ARCH_KEYS)}; got {unknown}")
    return solov2(num_classes=num_classes, **arch)


_BUILDERS: Dict[str, Callable[..., nn.Layer]] = {"PP-YOLOE_seg-S": _ppyoloe_seg_s, "SOLOv2": _solov2}
_BUILDERS.update({f"Mask-RT-DETR-{s}": _mask_rtdetr(s) for s in "SMLXH"})
_BUILDERS.update({n: _mask_rcnn(n) for n in MASK_RCNN_NAMES})

# Keys whose first dimension is the class count (any one present will do): they size a network
# for a weights file before loading it (e.g. exporting a fine-tuned 2-class checkpoint).
_CLASS_COUNT_KEYS: Dict[str, Tuple[str, ...]] = {
    "PP-YOLOE_seg-S": ("yolo_head.pred_cls.0.bias",),
    # SOLOv2 files may carry either name of the aliased category conv
    "SOLOv2": ("solov2_head.bbox_head.solo_cate.bias", "solov2_head.solo_cate.bias"),
}
_CLASS_COUNT_KEYS.update({f"Mask-RT-DETR-{s}": ("transformer.score_head.bias",) for s in "SMLXH"})
# the R-CNN mask logits conv has one output per class (the box classifier has C + 1)
_CLASS_COUNT_KEYS.update({n: ("mask_head.mask_fcn_logits.bias",) for n in MASK_RCNN_NAMES})


def build_model(name: str, num_classes: int = 80, **arch) -> nn.Layer:
    """The network of ``name`` (an official PaddleX model name) with ``num_classes`` classes.

    ``arch``: architecture overrides of a scalable family (PP-YOLOE_seg: ``width_mult``,
    ``depth_mult``, ``num_protos``; SOLOv2: ``seg_feat_channels``, ``stacked_convs``, ``num_grids``,
    ``kernel_out_channels``, ``mask_mid_channels``, ``fpn_channels``) for small custom models;
    official weights fit only the defaults.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; expected one of: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes, **arch)


def num_classes_in_weights(name: str, weights) -> int | None:
    """The class count a state dict of ``name`` was trained with (None when it cannot tell)."""
    for key in _CLASS_COUNT_KEYS.get(name, ()):
        if key in weights:
            return int(weights[key].shape[0])
    return None
