"""Training recipes: each family's official optimizer, schedule, EMA and input sizes (the
``recipe`` of its record in :mod:`instseg_core.families`), with a module YAML's overrides.

``Train.learning_rate`` / ``Train.warmup_steps`` / ``Train.batch_size`` of the module YAML override
the recipe's values, as PaddleX maps them onto PaddleDetection's config.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from instseg_core.families import TrainRecipe
from instseg_core.models import family_of, get_spec

__all__ = ["TrainRecipe", "evaluation_inputs", "recipe_for"]


def evaluation_inputs(model_name: str, recipe: TrainRecipe, input_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`~instseg_core.training.evaluator.evaluate_model` that validate
    ``model_name`` as it is trained and exported: the square resize for DETR/YOLOE, the exported
    predictor's keep-ratio preprocessing for R-CNN/SOLOv2; ``input_size`` overrides the recipe's."""
    size = recipe.input_size if input_size is None else int(input_size)
    if recipe.keep_ratio:
        from instseg_core.export import preprocess_for_size

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
    r = family_of(model_name).recipe
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
