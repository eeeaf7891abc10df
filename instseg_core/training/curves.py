"""Training curves on rank 0: TensorBoard scalars and ``train_curves.png`` under ``Global.output``.

:class:`TrainingCurves` is the loop's third hook. It writes, into ``<output>/tensorboard/`` (the
``visualdl_log`` of ``train_result.json``; PaddleX leaves that field empty), one TensorBoard event
file (:mod:`instseg_core.training.tfevents`) with these scalars:

* ``train/<term>`` and ``train/lr`` at the global step, every ``log_interval`` steps (the values
  the progress line of ``train.log`` shows);
* ``epoch/<term>``: each loss term's mean over the epoch's steps, at the 1-based epoch;
* ``eval/mask_AP`` and ``eval/box_AP`` at the 1-based epoch, on evaluation epochs.

After each epoch it redraws ``<output>/train_curves.png`` from the ``epoch/`` and ``eval/``
scalars. A resumed run keeps the events of the epochs before its start and drops those of the
epochs it trains again (a run that died after logging an epoch Ray Train had not registered), so
the curves read as if the run had never stopped, as ``train_result.json`` does. A fresh run in the
same output starts a new history (the file is rewritten).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import paddle

from instseg_core.io import atomic_write
from instseg_core.training.curve_plot import draw_train_curves
from instseg_core.training.tfevents import (FILE_VERSION, EventFileWriter, Scalar, encode_event, frame_record,
                                            read_scalars)

log = logging.getLogger("instseg.train")

LOG_DIR = "tensorboard"  # under Global.output: train_result.json's "visualdl_log"
# One file of a fixed name (TensorBoard only needs "tfevents" in it), not TensorBoard's
# time/host/pid names: a run restarted by Ray Train or resumed by hand continues the same file, so
# its output holds the same files as a run that never stopped.
EVENT_FILE = "events.out.tfevents.instseg-train"
CURVES_PNG = "train_curves.png"
_EPOCH_INDEXED = ("epoch/", "eval/")  # tags whose step is the 1-based epoch, not the global step
_AP_TAGS = {"eval/mask_AP": "mask AP", "eval/box_AP": "box AP"}


class TrainingCurves:
    """Scalars and the curves PNG of one training run (see the module doc).

    ``resume_at``: ``(epochs done, global steps done)`` of the checkpoint a resumed run starts
    from; None for a fresh run.
    """

    def __init__(self, output: Path, title: str = "", resume_at: tuple[int, int] | None = None) -> None:
        self.output, self.title = Path(output), title
        path = self.output / LOG_DIR / EVENT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = _kept_scalars(path, *resume_at) if resume_at is not None and path.is_file() else []
        _rewrite(path, kept)  # a fresh run starts an empty history
        self.writer = EventFileWriter(path)
        self.epochs: dict[str, dict[int, float]] = {}  # epoch-indexed tag -> {epoch: value}
        for s in kept:
            if s.tag.startswith(_EPOCH_INDEXED):
                self.epochs.setdefault(s.tag, {})[s.step] = s.value
        self._sums: dict[str, paddle.Tensor] = {}
        self._count = 0

    @property
    def event_file(self) -> Path:
        """The event file being written."""
        return self.writer.path

    def after_step(self, step: int, losses: dict[str, paddle.Tensor], lr: float,
                   logged: dict[str, float] | None) -> None:
        """After global step ``step`` (1-based). ``logged``: the loss values the step logger read on
        this step (None on steps it skipped): only those are written, so no other step waits for
        the device. The epoch means are summed on the device meanwhile."""
        for name, value in losses.items():
            v = value.detach().astype("float32")
            self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._count += 1
        if logged is not None:
            self.writer.add_scalars(step, {**{f"train/{k}": v for k, v in logged.items()}, "train/lr": lr})

    def after_epoch(self, epoch: int, scores: dict[str, Any]) -> None:
        """After ``epoch`` (0-based): the epoch's mean losses, its AP when evaluated, and the PNG."""
        n = epoch + 1
        values = {f"epoch/{k}": float(v.item()) / self._count for k, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        if "AP" in scores:
            values["eval/mask_AP"] = float(scores["AP"])
        if "box_AP" in scores:
            values["eval/box_AP"] = float(scores["box_AP"])
        self.writer.add_scalars(n, values)
        for tag, v in values.items():
            self.epochs.setdefault(tag, {})[n] = v
        self.draw()

    def draw(self) -> None:
        """(Re)draw ``train_curves.png``; a plotting failure is logged, never fatal to training."""
        losses = {t.removeprefix("epoch/"): pts for t, pts in self.epochs.items() if t.startswith("epoch/")}
        ap = {label: self.epochs.get(tag, {}) for tag, label in _AP_TAGS.items()}
        try:
            draw_train_curves(losses, ap, self.output / CURVES_PNG, self.title)
        except Exception as e:  # noqa: BLE001 - a picture must not cost a training run
            log.warning("could not draw %s: %s: %s", self.output / CURVES_PNG, type(e).__name__, e)

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


def _kept_scalars(path: Path, epochs_done: int, steps_done: int) -> list[Scalar]:
    """The scalars of the event file at ``path`` up to the resume point; a later write of the same
    (tag, step) wins. A file that cannot be read is dropped with a warning (its curves restart)."""
    try:
        scalars = read_scalars(path)
    except (OSError, ValueError) as e:
        log.warning("training curves: cannot read %s (%s); the curves restart at this run", path, e)
        return []
    latest: dict[tuple[str, int], Scalar] = {}
    for s in scalars:
        if s.step <= (epochs_done if s.tag.startswith(_EPOCH_INDEXED) else steps_done):
            latest[(s.tag, s.step)] = s
    return sorted(latest.values(), key=lambda s: (s.wall_time, s.step))


def _rewrite(path: Path, scalars: list[Scalar]) -> None:
    """Replace the event file at ``path`` by one holding ``scalars`` (atomically)."""
    first = min((s.wall_time for s in scalars), default=time.time())
    records = [frame_record(encode_event(first, 0, file_version=FILE_VERSION))]
    records += [frame_record(encode_event(s.wall_time, s.step, scalars={s.tag: s.value})) for s in scalars]
    atomic_write(path, lambda f: f.write(b"".join(records)))
