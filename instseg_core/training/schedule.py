"""Learning-rate schedules and the exponential moving average of weights (EMA)."""
from __future__ import annotations

import math
from typing import Sequence

import paddle
import paddle.nn as nn


def learning_rate(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  warmup_start_factor: float = 0.0, schedule: str = "cosine", min_factor: float = 0.0,
                  milestones: Sequence[float] = (), gamma: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then ``cosine`` decay, ``constant``, or
    ``piecewise`` (times ``gamma`` at each of ``milestones``, fractions of ``total_steps``).

    Warm-up goes linearly from ``base_lr * warmup_start_factor`` to ``base_lr`` over ``warmup_steps``
    (for piecewise: to the current piecewise value, should a milestone fall inside the warm-up);
    cosine decay then goes from ``base_lr`` to ``base_lr * min_factor`` at ``total_steps``.
    """
    if schedule == "piecewise":
        drops = sum(step >= int(round(m * total_steps)) for m in milestones)
        lr = base_lr * gamma ** drops
        if warmup_steps > 0 and step < warmup_steps:
            lr *= warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
        return lr
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        return base_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * alpha)
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"unknown LR schedule {schedule!r}; expected 'cosine', 'constant' or 'piecewise'")
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t)))


class ModelEMA:
    """Exponential moving average of a model's state (parameters and BN statistics).

    The decay ramps up as ``decay * (1 - exp(-updates / tau))`` so that early, still-changing
    weights are not frozen into the average (the "exponential" EMA of PP-YOLOE / YOLOv5).
    Evaluation and export use the averaged weights.
    """

    def __init__(self, model: nn.Layer, decay: float = 0.9998, tau: float = 2000.0):
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = 0
        self.state: dict[str, paddle.Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.tau)) if self.tau > 0 else self.decay

    @paddle.no_grad()
    def update(self, model: nn.Layer) -> None:
        self.updates += 1
        d = self.current_decay()
        for k, v in model.state_dict().items():
            ema = self.state[k]
            if paddle.is_floating_point(v):
                ema.set_value(ema * d + v.detach() * (1.0 - d))
            else:  # integer buffers (counters) are copied
                ema.set_value(v.detach())

    def state_dict(self) -> dict[str, paddle.Tensor]:
        return self.state

    def set_state_dict(self, state: dict[str, paddle.Tensor], updates: int) -> None:
        for k, v in state.items():
            if k in self.state:
                self.state[k].set_value(paddle.to_tensor(v, dtype=self.state[k].dtype))
        self.updates = int(updates)
