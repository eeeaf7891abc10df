"""Per-family training recipes: the official configs' optimizer, schedule, EMA and input sizes.

``Train.learning_rate`` / ``Train.warmup_steps`` / ``Train.batch_size`` of the module YAML override
the recipe's values, as PaddleX maps them onto PaddleDetection's config.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Tuple

from ..models import MASK_RTDETR, PPYOLOE_SEG, get_spec


@dataclass(frozen=True)
class TrainRecipe:
    optimizer: str  # "momentum" | "adamw"
    base_lr: float
    weight_decay: float
    schedule: str  # "cosine" | "constant"
    warmup_steps: int
    warmup_start_factor: float
    grad_clip_norm: float  # 0 = no clipping
    backbone_lr_mult: float
    ema_decay: float  # 0 = no EMA
    input_size: int
    multiscale: Tuple[int, ...] = ()
    cosine_epochs_factor: float = 1.0  # cosine period = epochs * factor (PP-YOLOE decays over 96/80)
    mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: Tuple[float, float, float] = (1.0, 1.0, 1.0)


RECIPES = {
    # ppyoloe_seg_s_80e_coco: Momentum 0.9 + L2 5e-4, cosine over 96 epochs for an 80-epoch run,
    # linear warm-up from 0, EMA 0.9998, multi-scale 320..768.
    PPYOLOE_SEG: TrainRecipe("momentum", 0.001, 5e-4, "cosine", 100, 0.0, 0.0, 1.0, 0.9998, 640,
                             tuple(range(320, 769, 32)), cosine_epochs_factor=96 / 80),
    # mask_rtdetr_*_6x_coco: AdamW 1e-4, weight decay 1e-4, grad-norm clip 0.1, backbone LR x0.1,
    # 2000-step linear warm-up from 0.001, constant LR, EMA 0.9999, multi-scale 480..800.
    MASK_RTDETR: TrainRecipe("adamw", 1e-4, 1e-4, "constant", 2000, 0.001, 0.1, 0.1, 0.9999, 640,
                             tuple(range(480, 801, 32))),
}


def recipe_for(model_name: str, train_cfg: Mapping[str, Any] | None = None) -> TrainRecipe:
    """The family recipe of ``model_name`` with the ``Train`` section's overrides applied.

    Keys read: ``learning_rate``, ``warmup_steps``, ``input_size``, ``multiscale`` (a list of
    sizes, or false to train at ``input_size`` only), ``ema_decay`` (0 disables EMA),
    ``grad_clip_norm``, ``weight_decay``, ``optimizer`` (``momentum`` or ``adamw``; AdamW trains
    small models from scratch much faster), ``schedule`` (``cosine`` or ``constant``).
    """
    spec = get_spec(model_name)
    if spec.family not in RECIPES:
        raise NotImplementedError(f"training {model_name!r} ({spec.family}) is not implemented yet; "
                                  f"trainable families: {', '.join(sorted(RECIPES))}")
    r = RECIPES[spec.family]
    t = dict(train_cfg or {})
    changes: dict[str, Any] = {}
    if t.get("learning_rate") is not None:
        changes["base_lr"] = float(t["learning_rate"])
    if t.get("warmup_steps") is not None:
        changes["warmup_steps"] = int(t["warmup_steps"])
    for key in ("ema_decay", "grad_clip_norm", "weight_decay"):
        if t.get(key) is not None:
            changes[key] = float(t[key])
    for key, allowed in (("optimizer", ("momentum", "adamw")), ("schedule", ("cosine", "constant"))):
        if t.get(key) is not None:
            value = str(t[key]).lower()
            if value not in allowed:
                raise ValueError(f"Train.{key} must be one of {', '.join(allowed)}, got {t[key]!r}")
            changes[key] = value
    if t.get("input_size") is not None:
        size = int(t["input_size"])
        if size < 32 or size % 32:
            raise ValueError(f"Train.input_size must be a positive multiple of 32, got {size}")
        changes["input_size"] = size
        changes["multiscale"] = ()  # an explicit size means: train at that size
    if "multiscale" in t and t["multiscale"] is not None:
        ms = t["multiscale"]
        changes["multiscale"] = tuple(int(s) for s in ms) if ms else ()
    return replace(r, **changes)
