"""What :func:`instseg_core.training.engine.train` does around its steps, on rank 0.

Two hooks, called by the loop at fixed points (plain objects, no registry):

* :class:`StepLogger`, after every step: the progress line of ``train.log`` (every
  ``log_interval`` steps and at an epoch's last step), and a stop on a non-finite loss.
* :class:`EvaluateAndCheckpoint`, after every epoch: on evaluation epochs, mask AP on the val
  split (with the EMA weights when kept), the epoch checkpoint, rotation to the ``KEEP_LAST``
  newest, a new ``best_model/`` when the AP is the best so far, and ``train_result.json``
  (its ``visualdl_log`` names the TensorBoard dir of :mod:`instseg_core.training.curves`, the
  third hook).

The files follow PaddleX's layout under ``Global.output`` (see the engine's module doc).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import paddle
import paddle.nn as nn

from instseg_core.io import atomic_write
from instseg_core.training.checkpoint import optimizer_state_by_structured_name, save_checkpoint
from instseg_core.training.curves import LOG_DIR
from instseg_core.training.data import CocoInstanceDataset
from instseg_core.training.recipes import evaluation_inputs
from instseg_core.training.schedule import ModelEMA
from instseg_core.training.settings import TrainSettings


log = logging.getLogger("instseg.train")

KEEP_LAST = 5  # epoch checkpoints kept, as PaddleX's train_result.json lists last_1..last_5


# ------------------------------------------------------------------------------------ after a step

class StepLogger:
    """Logs the step's losses, learning rate, speed and ETA every ``log_interval`` steps and at
    each epoch's last step. Losses are read (which waits for the device) only on those steps, so
    a non-finite loss is caught there: it stops training with advice instead of writing NaN weights."""

    def __init__(self, epochs: int, steps_per_epoch: int, log_interval: int) -> None:
        self.epochs, self.steps_per_epoch, self.log_interval = epochs, steps_per_epoch, log_interval
        self._t0 = time.time()

    def start_epoch(self) -> None:
        """Start the epoch's clock (the s/step figure includes data loading)."""
        self._t0 = time.time()

    def __call__(self, epoch: int, k: int, lr: float, losses: dict[str, paddle.Tensor]) -> dict[str, float] | None:
        """After step ``k`` (0-based, within ``epoch``) trained with ``lr``; returns the loss values
        it read and logged, or None on the steps it skips (the training curves log the same)."""
        if not (k % self.log_interval == 0 or k == self.steps_per_epoch - 1):
            return None
        values = {n: float(v.item()) for n, v in losses.items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at epoch {epoch} step {k}: "
                                     f"lower Train.learning_rate or check the dataset")
        dt = (time.time() - self._t0) / (k + 1)
        eta = dt * ((self.epochs - epoch) * self.steps_per_epoch - k - 1)
        log.info("epoch [%d/%d] step [%d/%d] lr %.6g %s | %.2f s/step, eta %s", epoch + 1, self.epochs,
                 k + 1, self.steps_per_epoch, lr, _fmt_losses(values), dt, _eta(eta))
        return values


def _fmt_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:.4f}" for k, v in losses.items())


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------ after an epoch

class EvaluateAndCheckpoint:
    """Rank 0's end of an epoch: evaluate, checkpoint, rotate, export the best model, record.

    ``best_ap``, ``last`` (the ``last_N`` entries, newest first) and ``best`` carry over from a
    resumed run's ``train_result.json`` (:meth:`resumed`), so the record reads as if the run had
    never stopped.
    """

    def __init__(self, settings: TrainSettings, model: nn.Layer, optimizer: paddle.optimizer.Optimizer,
                 ema: ModelEMA | None, val_ds: CocoInstanceDataset, labels: list[str], best_ap: float = -1.0
                 ) -> None:
        self.s, self.model, self.optimizer, self.ema = settings, model, optimizer, ema
        self.val_ds, self.labels = val_ds, labels
        self.best_ap = best_ap
        self.last: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}

    def resumed(self, start_epoch: int) -> None:
        """Take the entries of the ``train_result.json`` in ``Global.output`` that a run resumed
        at ``start_epoch`` keeps (see :func:`_previous_entries`)."""
        self.last = _previous_entries(self.s.output, start_epoch)
        self.best = _previous_record(self.s.output).get("models", {}).get("best", {})

    def __call__(self, epoch: int, step: int) -> tuple[dict[str, float], Path | None]:
        """After ``epoch`` (0-based), ``step`` steps in all: ``({"AP", "box_AP"}, checkpoint dir)``
        on evaluation epochs (every ``eval_interval``-th and the last), ``({}, None)`` otherwise."""
        s, model, ema = self.s, self.model, self.ema
        if not ((epoch + 1) % s.eval_interval == 0 or epoch + 1 == s.epochs):
            return {}, None
        from instseg_core.training.evaluator import evaluate_model

        eval_state = ema.state_dict() if ema is not None else None
        raw = _swap_in(model, eval_state)
        try:
            stats = evaluate_model(model, self.val_ds, **evaluation_inputs(s.model_name, s.recipe))
        finally:
            _swap_back(model, raw)
        ap = float(stats["segm"]["AP"])
        log.info("epoch %d: mask AP %.4f, box AP %.4f", epoch + 1, ap, stats["bbox"]["AP"])
        name = str(epoch)
        ckpt_dir = save_checkpoint(
            s.output / name, name,
            weights=eval_state if eval_state is not None else model.state_dict(),
            raw_weights=model.state_dict() if ema is not None else None,
            optimizer_state=optimizer_state_by_structured_name(self.optimizer, model),
            states={"epoch": epoch + 1, "step": step, "best_ap": max(self.best_ap, ap), "seed": s.seed,
                    "ema_updates": ema.updates if ema is not None else 0})
        self.last.insert(0, _entry(s.output, ckpt_dir, name, ap, with_inference=False))
        for old in self.last[KEEP_LAST:]:
            shutil.rmtree(s.output / Path(old["pdparams"]).parent, ignore_errors=True)
        del self.last[KEEP_LAST:]
        if ap >= self.best_ap:
            self.best_ap = ap
            self.best = _save_best(s, model, eval_state, ckpt_dir, name, ap, epoch, self.labels)
        _write_train_result(s.output, s.model_name, self.last, self.best, done=epoch + 1 == s.epochs)
        return {"AP": ap, "box_AP": float(stats["bbox"]["AP"])}, ckpt_dir


def _swap_in(model: nn.Layer, state: dict[str, paddle.Tensor] | None) -> dict[str, paddle.Tensor] | None:
    """Load ``state`` (EMA weights) into ``model`` for evaluation; returns what to restore."""
    if state is None:
        return None
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.set_state_dict(state)
    return raw


def _swap_back(model: nn.Layer, raw: dict[str, paddle.Tensor] | None) -> None:
    if raw is not None:
        model.set_state_dict(raw)


# ------------------------------------------------------------------------------------ output files

def _entry(output: Path, ckpt_dir: Path, name: str, score: float, with_inference: bool) -> dict[str, Any]:
    rel = ckpt_dir.relative_to(output)
    e: dict[str, Any] = {"score": float(score)}
    for suffix in ("pdparams", "pdopt", "pdstates", "pdema"):
        if (ckpt_dir / f"{name}.{suffix}").exists():
            e[suffix] = str(rel / f"{name}.{suffix}")
    if with_inference and (ckpt_dir / "inference" / "inference.yml").exists():
        e["inference_config"] = str(rel / "inference" / "inference.yml")
        e["pdmodel"] = str(rel / "inference" / "inference.json")
        e["pdiparams"] = str(rel / "inference" / "inference.pdiparams")
    return e


def _write_train_result(output: Path, model_name: str, last: list[dict[str, Any]], best: dict[str, Any],
                        done: bool) -> None:
    models = {f"last_{i + 1}": (last[i] if i < len(last) else {}) for i in range(KEEP_LAST)}
    models["best"] = best
    record = {"model_name": model_name, "label_dict": "", "train_log": "train.log", "visualdl_log": LOG_DIR,
              "config": "config.yaml", "models": models, "done_flag": done}
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    atomic_write(output / "train_result.json", lambda f: f.write(text.encode("utf-8")))


def _save_best(s: TrainSettings, model: nn.Layer, eval_state: dict[str, paddle.Tensor] | None, ckpt_dir: Path,
               name: str, ap: float, epoch: int, labels: list[str]) -> dict[str, Any]:
    """Copy the checkpoint and export the model into ``best_model/``.

    Written into ``best_model.tmp/`` and swapped in by renames once complete, so a process killed
    during the export (seconds) leaves the previous best model in place, not a partial one.
    """
    from instseg_core.export import export_model

    best_dir, tmp_dir, old_dir = (s.output / f"best_model{x}" for x in ("", ".tmp", ".old"))
    for d in (tmp_dir, old_dir):
        shutil.rmtree(d, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    for f in ckpt_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp_dir / f"best_model{f.suffix}")
    (tmp_dir / "best_model.info.json").write_text(json.dumps({"metric": ap, "epoch": epoch}) + "\n")
    raw = _swap_in(model, eval_state)
    try:
        export_model(model, None, tmp_dir / "inference", input_size=s.recipe.input_size, labels=labels,
                     draw_threshold=s.draw_threshold)
    finally:
        _swap_back(model, raw)
    if best_dir.exists():
        os.replace(best_dir, old_dir)
    os.replace(tmp_dir, best_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    return _entry(s.output, best_dir, "best_model", ap, with_inference=True)


def recover_best_model(output: Path) -> None:
    """Undo what a process killed inside :func:`_save_best` left: drop an unfinished
    ``best_model.tmp/``, and put ``best_model.old/`` back if it died between the two renames."""
    shutil.rmtree(output / "best_model.tmp", ignore_errors=True)
    old = output / "best_model.old"
    if old.is_dir():
        if (output / "best_model").exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, output / "best_model")


def _previous_record(output: Path) -> dict[str, Any]:
    try:
        return json.loads((output / "train_result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _previous_entries(output: Path, start_epoch: int) -> list[dict[str, Any]]:
    """The ``last_N`` checkpoints ``train_result.json`` in ``output`` lists, newest first, minus
    those of epochs a run resumed at ``start_epoch`` trains again: a run that died after writing an
    epoch's checkpoint but before it was reported (Ray Train restarts from the one before) would
    otherwise list that epoch twice."""
    models = _previous_record(output).get("models", {})
    entries = [models[f"last_{i + 1}"] for i in range(KEEP_LAST) if models.get(f"last_{i + 1}")]
    return [e for e in entries if _entry_epoch(e) is None or _entry_epoch(e) < start_epoch]


def _entry_epoch(entry: dict[str, Any]) -> int | None:
    """The 0-based epoch of a ``last_N`` entry (its checkpoint directory is named after it)."""
    name = Path(str(entry.get("pdparams", ""))).parent.name
    return int(name) if name.isdigit() else None
