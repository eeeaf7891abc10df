"""Shared by the family training tests: a few optimizer steps on one fixed batch."""
from __future__ import annotations

import paddle


def train_steps(model, inputs, targets, optimizer: paddle.optimizer.Optimizer, steps: int) -> list[dict[str, float]]:
    """Run ``steps`` forward/backward/update steps of ``model`` (train mode) on one batch; the loss
    terms of every step."""
    model.train()
    history = []
    for _ in range(steps):
        losses = model(inputs, targets)
        losses["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
        history.append({k: float(v) for k, v in losses.items()})
    return history
