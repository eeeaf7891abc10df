"""Progress lines with a rate and an ETA, for loops that finish items one by one (``instseg
predict`` over a directory) and for the batch job's driver."""

from __future__ import annotations

import logging
import time

__all__ = ["ProgressLog", "format_duration", "eta_seconds"]


def format_duration(seconds: float) -> str:
    """``42`` -> ``42s``; ``95`` -> ``1m35s``; ``7300`` -> ``2h01m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_seconds(done: int, todo: int, seconds_since_first: float) -> float | None:
    """Seconds left for ``todo - done`` items at the rate seen since the first item finished (the
    start-up before it, e.g. loading a model, says nothing about the rate); None before that."""
    if done <= 0 or seconds_since_first <= 0:
        return None
    return max(todo - done, 0) * seconds_since_first / done


class ProgressLog:
    """Logs ``<prefix>: 12/340 images (3.5%), 2.10 images/s, 1 errors, 6s elapsed, ETA 2m36s`` at
    most every ``interval_s`` seconds (0: after every item) as items finish; ``total=None`` when
    the count is unknown (no percentage or ETA)."""

    def __init__(self, total: int | None, interval_s: float = 10.0, *, prefix: str = "progress",
                 logger: logging.Logger | None = None):
        self.total, self.interval_s, self.prefix = total, interval_s, prefix
        self.log = logger or logging.getLogger("instseg")
        self.done = self.errors = 0
        self.t0 = self.last = time.monotonic()
        self.t_first: float | None = None
        self.first_done = 0

    def step(self, n: int = 1, errors: int = 0) -> None:
        """Count ``n`` finished items (``errors`` of them failed); log when the interval is up."""
        now = time.monotonic()
        if self.t_first is None:  # the first items' time includes start-up (model load)
            self.t_first, self.first_done = now, n
        self.done += n
        self.errors += errors
        if now - self.last >= self.interval_s:
            self.last = now
            self.log.info("%s", self.line())

    def line(self) -> str:
        now = time.monotonic()
        elapsed = now - self.t0
        text = f"{self.prefix}: {self.done}"
        if self.total:
            text += f"/{self.total} images ({100.0 * self.done / self.total:.1f}%)"
        else:
            text += " images"
        text += f", {self.done / max(elapsed, 1e-9):.2f} images/s, {self.errors} errors, " \
                f"{format_duration(elapsed)} elapsed"
        eta = None if self.total is None or self.t_first is None else eta_seconds(
            self.done - self.first_done, self.total - self.first_done, now - self.t_first)
        if eta is not None and self.done < self.total:
            text += f", ETA {format_duration(eta)}"
        return text
