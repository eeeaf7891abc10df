"""How a job predicts: one settings type for every job that runs the model on an actor pool
(batch labelling, evaluation), so a flag or YAML key means the same thing in each."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from instseg_core.inference.predictor import DEFAULT_MAX_MASK_SIDE
from instseg_core.io import S3Options, is_remote


@dataclass(kw_only=True)
class PredictionSettings:
    """The model, how it predicts, and the actor pool that runs it."""

    model_name: str | None = None
    model_dir: str | None = None
    batch_size: int = 4
    threshold: float | None = None
    device: str = "cpu"
    num_actors: int | None = None  # fixed pool size; else min_actors..max_actors (autoscaling)
    min_actors: int = 1
    max_actors: int | None = None
    num_gpus_per_actor: float = 0.0  # fractional: two actors can share a GPU and overlap CPU work
    num_cpus_per_actor: float = 1.0
    cpu_threads: int | None = None  # Paddle threads per actor (default: num_cpus_per_actor)
    use_hpip: bool = False  # high-performance mode: ONNX Runtime / OpenVINO (instseg_core.inference.hpi)
    hpi_config: dict[str, Any] | None = None  # PaddleX's hpi_config keys: backend, backend_config, auto_config
    max_pixels: int = 80_000_000  # larger images become error rows instead of exhausting memory
    max_mask_side: int | None = DEFAULT_MAX_MASK_SIDE  # masks drawn at most this large, then upsampled
    actor_memory_gb: float | None = None  # memory each actor reserves and its predictor may use (None: estimate)
    predict_timeout_s: float = 600.0  # per image of a batch: a predictor silent for longer is restarted
    s3_endpoint: str | None = None
    s3_region: str | None = None
    progress_interval_s: float = 10.0

    def s3(self) -> S3Options:
        return S3Options.from_env(self.s3_endpoint, self.s3_region)

    @property
    def model_label(self) -> str:
        return self.model_name or os.path.basename(str(self.model_dir).rstrip("/"))

    def absolute_paths(self, *names: str) -> None:
        """Make the local paths among ``model_dir`` and ``names`` absolute, in place: Ray's tasks and
        actors run in other working directories (a running cluster's, a job's working dir)."""
        for name in ("model_dir", *names):
            value = getattr(self, name)
            if value and not is_remote(value):
                setattr(self, name, os.path.abspath(value))

    def prediction_settings(self) -> dict[str, Any]:
        """This object's :class:`PredictionSettings` fields, to build another job's config from."""
        return {f.name: getattr(self, f.name) for f in fields(PredictionSettings)}


PREDICTION_FIELDS = frozenset(f.name for f in fields(PredictionSettings))
