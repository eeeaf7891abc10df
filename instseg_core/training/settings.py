"""The ``Global`` + ``Train`` keys of a module config that the training loop and its hooks use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instseg_core.families import TrainRecipe
from instseg_core.models import get_spec
from instseg_core.training.recipes import recipe_for


@dataclass
class TrainSettings:
    """The ``Global`` + ``Train`` keys the loop uses, validated."""

    model_name: str
    dataset_dir: str
    output: Path
    device: str
    num_classes: int
    epochs: int
    batch_size: int
    log_interval: int
    eval_interval: int
    pretrain_weight_path: str | None
    resume_path: str | None
    seed: int
    amp: str
    sync_bn: bool
    draw_threshold: float
    arch: dict[str, Any]
    recipe: TrainRecipe

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TrainSettings":
        g, t = cfg.get("Global") or {}, cfg.get("Train") or {}
        if not g.get("dataset_dir"):
            raise ValueError("Global.dataset_dir is not set (a dataset in PaddleX's COCO layout)")
        name = g["model"]
        spec = get_spec(name)

        def positive(key: str, default: Any) -> int:
            v = t.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Train.{key} must be a positive integer, got {v!r}")
            return v

        amp = str(t.get("amp") or "OFF").upper()
        if amp not in ("OFF", "O1", "O2"):
            raise ValueError(f"Train.amp must be OFF, O1 or O2, got {t.get('amp')!r}")
        return cls(
            model_name=name, dataset_dir=str(g["dataset_dir"]), output=Path(g.get("output", "output")),
            device=str(g.get("device") or "cpu").split(",")[0],
            num_classes=positive("num_classes", len(spec.labels)), epochs=positive("epochs_iters", 1),
            batch_size=positive("batch_size", spec.train_batch_size),
            log_interval=positive("log_interval", 10), eval_interval=positive("eval_interval", 1),
            pretrain_weight_path=t.get("pretrain_weight_path") or None, resume_path=t.get("resume_path") or None,
            seed=int(t.get("seed", 0)), amp=amp, sync_bn=bool(t.get("sync_bn", True)),
            draw_threshold=float(t.get("draw_threshold", 0.5)),
            arch=dict(t.get("arch") or {}), recipe=recipe_for(name, t))
