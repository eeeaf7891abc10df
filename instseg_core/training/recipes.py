"""Per-family training recipes: the official configs' optimizer, schedule, EMA and input sizes.

``Train.learning_rate`` / ``Train.warmup_steps`` / ``Train.batch_size`` of the module YAML override
the recipe's values, as PaddleX maps them onto PaddleDetection's config.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Tuple

from ..models import CASCADE_RCNN, IMAGENET_MEAN, IMAGENET_STD, MASK_RTDETR, MASKRCNN, PPYOLOE_SEG, SOLOV2, get_spec

_IMAGENET = {"mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD)}


@dataclass(frozen=True)
class TrainRecipe:
    optimizer: str  # "momentum" | "adamw"
    base_lr: float
    weight_decay: float
    schedule: str  # "cosine" | "constant" | "piecewise"
    warmup_steps: int
    warmup_start_factor: float
    grad_clip_norm: float  # 0 = no clipping
    backbone_lr_mult: float
    ema_decay: float  # 0 = no EMA
    input_size: int  # square side, or with keep_ratio_max the short side (evaluation and export size)
    multiscale: Tuple[int, ...] = ()  # training sizes (square sides or short sides) drawn per image
    cosine_epochs_factor: float = 1.0  # cosine period = epochs * factor (PP-YOLOE decays over 96/80)
    mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    milestones: Tuple[float, ...] = ()  # piecewise: fractions of the run where the LR drops x0.1
    keep_ratio_max: int = 0  # > 0: keep-ratio resize (short side as above, long side <= this)

    @property
    def keep_ratio(self) -> bool:
        return self.keep_ratio_max > 0


RECIPES = {
    # ppyoloe_seg_s_80e_coco: Momentum 0.9 + L2 5e-4, cosine over 96 epochs for an 80-epoch run,
    # linear warm-up from 0, EMA 0.9998, multi-scale 320..768.
    PPYOLOE_SEG: TrainRecipe("momentum", 0.001, 5e-4, "cosine", 100, 0.0, 0.0, 1.0, 0.9998, 640,
                             tuple(range(320, 769, 32)), cosine_epochs_factor=96 / 80),
    # mask_rtdetr_*_6x_coco: AdamW 1e-4, weight decay 1e-4, grad-norm clip 0.1, backbone LR x0.1,
    # 2000-step linear warm-up from 0.001, constant LR, EMA 0.9999, multi-scale 480..800.
    MASK_RTDETR: TrainRecipe("adamw", 1e-4, 1e-4, "constant", 2000, 0.001, 0.1, 0.1, 0.9999, 640,
                             tuple(range(480, 801, 32))),
    # mask_rcnn_*_1x_coco: Momentum 0.9 + L2 1e-4, LR 0.01, warm-up 1000 steps from 0.001, x0.1 at
    # epochs 8 and 11 of 12 (here: at 8/12 and 11/12 of any run length), no EMA, keep-ratio resize
    # with the short side drawn from 640..800 (long side <= 1333), ImageNet normalisation.
    MASKRCNN: TrainRecipe("momentum", 0.01, 1e-4, "piecewise", 1000, 0.001, 0.0, 1.0, 0.0, 800,
                          tuple(range(640, 801, 32)), **_IMAGENET,
                          milestones=(8 / 12, 11 / 12), keep_ratio_max=1333),
    # cascade_mask_rcnn_*_1x_coco: the same, plus gradient clipping at global norm 35
    CASCADE_RCNN: TrainRecipe("momentum", 0.01, 1e-4, "piecewise", 1000, 0.001, 35.0, 1.0, 0.0, 800,
                              tuple(range(640, 801, 32)), **_IMAGENET,
                              milestones=(8 / 12, 11 / 12), keep_ratio_max=1333),
    # solov2_r50_fpn_1x_coco: as Mask R-CNN but warm-up from 0 and one training size (800 x 1333)
    SOLOV2: TrainRecipe("momentum", 0.01, 1e-4, "piecewise", 1000, 0.0, 0.0, 1.0, 0.0, 800, (),
                        **_IMAGENET, milestones=(8 / 12, 11 / 12), keep_ratio_max=1333),
}


def evaluation_inputs(model_name: str, recipe: TrainRecipe, input_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`~instseg_core.training.evaluator.evaluate_model` that validate
    ``model_name`` as it is trained and exported: the square resize for DETR/YOLOE, the exported
    predictor's keep-ratio preprocessing for R-CNN/SOLOv2; ``input_size`` overrides the recipe's."""
    size = recipe.input_size if input_size is None else int(input_size)
    if recipe.keep_ratio:
        from ..export import preprocess_for_size

        return {"preprocess": preprocess_for_size(get_spec(model_name).preprocess, size)}
    return {"input_size": size, "mean": recipe.mean, "std": recipe.std}


def recipe_for(model_name: str, train_cfg: Mapping[str, Any] | None = None) -> TrainRecipe:
    """The family recipe of ``model_name`` with the ``Train`` section's overrides applied.

    Keys read: ``learning_rate``, ``warmup_steps``, ``input_size``, ``multiscale`` (a list of
    sizes, or false to train at ``input_size`` only), ``ema_decay`` (0 disables EMA),
    ``grad_clip_norm``, ``weight_decay``, ``optimizer`` (``momentum`` or ``adamw``; AdamW trains
    small models from scratch much faster), ``schedule`` (``cosine``, ``constant`` or ``piecewise``).
    For the keep-ratio families (R-CNN, SOLOv2) ``input_size`` and ``multiscale`` are short sides.
    """
    r = RECIPES[get_spec(model_name).family]  # every family has one
    t = dict(train_cfg or {})
    changes: dict[str, Any] = {}
    if t.get("learning_rate") is not None:
        changes["base_lr"] = float(t["learning_rate"])
    if t.get("warmup_steps") is not None:
        changes["warmup_steps"] = int(t["warmup_steps"])
    for key in ("ema_decay", "grad_clip_norm", "weight_decay"):
        if t.get(key) is not None:
            changes[key] = float(t[key])
    for key, allowed in (("optimizer", ("momentum", "adamw")), ("schedule", ("cosine", "constant", "piecewise"))):
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
