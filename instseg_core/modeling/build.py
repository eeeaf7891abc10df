"""Build a (randomly initialised) model by its official PaddleX name."""
from __future__ import annotations

import paddle.nn as nn

from ..models import MODEL_NAMES

_BUILDERS = {}


def _ppyoloe_seg_s(num_classes: int, **arch) -> nn.Layer:
    from .ppyoloe_seg import ppyoloe_seg_s

    return ppyoloe_seg_s(num_classes=num_classes, **arch)


def _mask_rtdetr(size: str):
    def build(num_classes: int, **arch) -> nn.Layer:
        from .mask_rtdetr import mask_rtdetr

        if arch:
            raise ValueError(f"Mask-RT-DETR-{size} takes no architecture overrides, got {sorted(arch)}")
        return mask_rtdetr(size, num_classes=num_classes)

    return build


_BUILDERS["PP-YOLOE_seg-S"] = _ppyoloe_seg_s
for _size in "SMLXH":
    _BUILDERS[f"Mask-RT-DETR-{_size}"] = _mask_rtdetr(_size)


def build_model(name: str, num_classes: int = 80, **arch) -> nn.Layer:
    """The network of ``name``; raises NotImplementedError for names without an implementation yet.

    ``arch``: architecture overrides of a scalable family (PP-YOLOE_seg: ``width_mult``,
    ``depth_mult``, ``num_protos``) for small custom models; official weights fit only the defaults.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; expected one of: {', '.join(MODEL_NAMES)}")
    builder = _BUILDERS.get(name)
    if builder is None:
        raise NotImplementedError(
            f"model {name!r} is not implemented yet (implemented: {', '.join(sorted(_BUILDERS))})")
    return builder(num_classes, **arch)


# A key whose first dimension is the class count, per implemented model: sizes a network for a
# weights file before loading it (e.g. exporting a fine-tuned 2-class checkpoint).
_CLASS_COUNT_KEYS = {"PP-YOLOE_seg-S": "yolo_head.pred_cls.0.bias"}
_CLASS_COUNT_KEYS.update({f"Mask-RT-DETR-{s}": "transformer.score_head.bias" for s in "SMLXH"})


def num_classes_in_weights(name: str, weights) -> int | None:
    """The class count a state dict of ``name`` was trained with (None when it cannot tell)."""
    key = _CLASS_COUNT_KEYS.get(name)
    if key is None or key not in weights:
        return None
    return int(weights[key].shape[0])
