"""The model in a child process, so one image can never take its actor (and the job) down.

An actor of the batch job owns an :class:`IsolatedPredictor`: a child process that loads the model
once and turns ``(uri, bytes)`` batches into output rows (decode, predict, RLE). The parent watches
it while it works:

* the child's resident memory above ``memory_limit`` -> the child is killed (``out_of_memory``);
* the child dies on its own (a segfault, the kernel's OOM killer) -> ``crashed`` /
  ``out_of_memory`` (SIGKILL);
* no answer within ``timeout_s`` -> the child is killed (``timeout``).

The batch is then retried in halves, each on a fresh child, down to one image; an image that still
fails becomes an error row of that kind and the others get their labels. Every step is bounded: a
batch of B images costs at most ``2B - 1`` attempts, and a child that cannot even load the model
raises (the actor fails, and with it the job, with the child's message), never a retry loop.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from instseg_core.io import redact

log = logging.getLogger("instseg")

Item = tuple[str, bytes]  # (uri, encoded image)
Row = dict[str, Any]

# Test hook: a child whose batch holds a URI containing this string crashes (SIGSEGV) before
# predicting it, so tests can show that a crashing image costs only its own row.
CRASH_ON_ENV = "INSTSEG_TEST_CRASH_ON"


class ChildFailed(Exception):
    """The child died or was killed while working on a batch; ``kind`` is the error kind."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class WorkerStats:
    """What the parent had to do beyond plain batches (reported in summary.json)."""

    child_restarts: int = 0
    batch_splits: int = 0


def _rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _child_main(conn, make_handler: Callable[[dict], Callable[[list[Item]], list[Row]]], config: dict) -> None:
    """The child's loop: build the handler (loads the model), then answer batches until EOF."""
    try:
        handle = make_handler(config)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the actor
        conn.send(("error", f"cannot load the model: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        return
    conn.send(("ready", None))
    crash_on = os.environ.get(CRASH_ON_ENV)
    while True:
        try:
            items = conn.recv()
        except EOFError:
            return
        if crash_on and any(crash_on in uri for uri, _ in items):
            os.kill(os.getpid(), signal.SIGSEGV)
        conn.send(("rows", handle(items)))


class IsolatedPredictor:
    """Runs ``make_handler(config)`` in a child process and feeds it batches (see module doc).

    ``make_handler`` must be a module-level function (the child is spawned, not forked: Paddle's
    and Ray's threads do not survive a fork). ``error_row(uri, kind, message)`` builds the row of
    an image that failed.
    """

    def __init__(self, make_handler: Callable[[dict], Callable[[list[Item]], list[Row]]], config: dict,
                 error_row: Callable[[str, str, str], Row], *, memory_limit: int | None,
                 timeout_s: float = 900.0, start_timeout_s: float = 900.0, poll_s: float = 0.05):
        self.make_handler, self.config, self.error_row = make_handler, config, error_row
        self.memory_limit, self.timeout_s, self.start_timeout_s = memory_limit, timeout_s, start_timeout_s
        self.poll_s = poll_s
        self.stats = WorkerStats()
        self.peak_rss = 0
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self._start()

    # -- child lifecycle -----------------------------------------------------------------------
    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_main, args=(child, self.make_handler, self.config),
                                 name="instseg-predict", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        try:
            kind, payload = self._wait(self.start_timeout_s, "loading the model")
        except ChildFailed as e:
            raise RuntimeError(f"cannot start the predictor process: {e}") from None
        if kind == "error":
            self.close()
            raise RuntimeError(f"the predictor process failed: {payload}")

    def _restart(self) -> None:
        self.close()
        self.stats.child_restarts += 1
        self._start()

    def close(self) -> None:
        """Stop the child (idempotent)."""
        if self._proc is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._proc = None

    def _wait(self, timeout_s: float, doing: str) -> tuple[str, Any]:
        """The child's next message, watching its memory and its life while waiting."""
        proc, deadline = self._proc, time.monotonic() + timeout_s
        while True:
            try:
                if self._conn.poll(self.poll_s):
                    return self._conn.recv()
            except (EOFError, OSError):
                pass  # the child is gone: reported below
            rss = _rss_bytes(proc.pid)
            self.peak_rss = max(self.peak_rss, rss)
            if self.memory_limit and rss > self.memory_limit:
                self._kill()
                raise ChildFailed("out_of_memory", f"used {rss / 2**30:.2f} GiB while {doing}, more than the "
                                                   f"actor's {self.memory_limit / 2**30:.2f} GiB")
            if not proc.is_alive():
                code = proc.exitcode
                self._proc = None
                if code == -signal.SIGKILL:  # the kernel's OOM killer (or an operator) sent SIGKILL
                    raise ChildFailed("out_of_memory", f"killed (SIGKILL, usually out of memory) while {doing}")
                name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
                raise ChildFailed("crashed", f"the predictor process crashed ({name}) while {doing}")
            if time.monotonic() > deadline:
                self._kill()
                raise ChildFailed("timeout", f"no answer after {timeout_s:.0f} s while {doing}")

    def _kill(self) -> None:
        self._proc.kill()
        self._proc.join()
        self._proc = None

    # -- batches -------------------------------------------------------------------------------
    def __call__(self, items: list[Item]) -> list[Row]:
        """Rows for ``items``, one per item (in the order the handler gives them, then split halves in
        order); failures are rows, never exceptions."""
        if not items:
            return []
        if self._proc is None or not self._proc.is_alive():
            self._restart()
        try:
            try:
                self._conn.send(items)
            except OSError:
                pass  # the child died while taking the batch: _wait says how
            _, rows = self._wait(self.timeout_s, f"predicting {len(items)} image(s)")
            return rows
        except ChildFailed as e:
            if len(items) == 1:
                uri = redact(items[0][0])
                log.warning("skipping %s: %s (error_kind=%s)", uri, e, e.kind)
                return [self.error_row(items[0][0], e.kind, f"{uri}: {e}")]
            half = len(items) // 2
            self.stats.batch_splits += 1
            log.warning("a batch of %d image(s) failed (%s: %s); retrying it as %d + %d on a fresh predictor process",
                        len(items), e.kind, e, half, len(items) - half)
            return self(items[:half]) + self(items[half:])
