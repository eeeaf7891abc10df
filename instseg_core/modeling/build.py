"""Build a (randomly initialised) network by its official PaddleX name; all 15 are implemented.

Each name's family record (:mod:`instseg_core.families`) holds its builder and the weights keys
that tell a checkpoint's class count.
"""
from __future__ import annotations

from typing import Any, Mapping

from instseg_core.families import FAMILIES, Builder
from instseg_core.models import MODEL_NAMES, MODEL_SPECS
from instseg_core.modeling.base import InstanceSegModel

__all__ = ["build_model", "num_classes_in_weights"]

# official name -> its family's builder (every name has a network)
_BUILDERS: dict[str, Builder] = {name: FAMILIES[spec.family].build for name, spec in MODEL_SPECS.items()}


def build_model(name: str, num_classes: int = 80, **arch: Any) -> InstanceSegModel:
    """The network of ``name`` (an official PaddleX model name) with ``num_classes`` classes.

    ``arch``: architecture overrides of a scalable family (PP-YOLOE_seg: ``width_mult``,
    ``depth_mult``, ``num_protos``; SOLOv2: ``seg_feat_channels``, ``stacked_convs``, ``num_grids``,
    ``kernel_out_channels``, ``mask_mid_channels``, ``fpn_channels``) for small custom models;
    official weights fit only the defaults.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; expected one of: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](name, num_classes, **arch)


def num_classes_in_weights(name: str, weights: Mapping[str, Any]) -> int | None:
    """The class count a state dict of ``name`` was trained with (None when it cannot tell)."""
    spec = MODEL_SPECS.get(name)
    for key in FAMILIES[spec.family].class_count_keys if spec else ():
        if key in weights:
            return int(weights[key].shape[0])
    return None
