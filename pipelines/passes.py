"""One pass of the batch job in a driver process of its own, so the job's driver stays flat.

Every Ray Dataset execution leaves something behind in the process that ran it: Ray Data's
per-dataset bookkeeping, the remote functions and actor classes it defines, the core worker's
records of the pass's tasks; measured, about 1 MB per pass plus a little per image. Over the
1000 passes of a 100M-image job that is gigabytes. A child process that joins the same cluster,
runs the pass and exits takes all of it with it; the parent only receives each output batch's
counts (a few rows of five columns) through a pipe, for its progress lines.

The child exits on its own if the parent dies (a parent killed with SIGKILL cannot take it
along), so a rerun never races a leftover pass.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable, Iterator

import pyarrow as pa

log = logging.getLogger("instseg")

PassDataset = Callable[[dict[str, Any], list[dict[str, Any]], dict[str, list[str]]], Any]


class PassError(RuntimeError):
    """The pass's process failed; the message holds its traceback."""


def run_pass_in_child(make_dataset: PassDataset, config: dict[str, Any], shards: list[dict[str, Any]],
                      parts: dict[str, list[str]]) -> Iterator[pa.Table]:
    """Run ``make_dataset(config, shards, parts)`` (a module-level function returning a lazy Ray
    Dataset) in a new Python process (``python -m pipelines.passes``: it never imports the
    caller's main script) joined to this process's Ray cluster, and yield what iterating the
    Dataset yields. Raises :class:`PassError` if the child fails or dies."""
    import ray

    root = logging.getLogger()
    fmt = root.handlers[0].formatter._fmt if root.handlers and root.handlers[0].formatter else None  # noqa: SLF001
    job = (make_dataset, config, shards, parts, ray.get_runtime_context().gcs_address,
           logging.getLogger("instseg").getEffectiveLevel(), fmt)
    read_fd, write_fd = os.pipe()  # the child's messages; its stdout/stderr stay the job's log
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # this process's imports
    child = subprocess.Popen([sys.executable, "-m", "pipelines.passes", str(write_fd), str(os.getpid())],
                             stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
    os.close(write_fd)
    finished = False
    try:
        with child.stdin as stdin:
            stdin.write(pickle.dumps(job))
        with os.fdopen(read_fd, "rb") as messages:
            while True:
                try:
                    kind, payload = pickle.load(messages)
                except EOFError:
                    break
                if kind == "batch":
                    yield payload
                elif kind == "error":
                    raise PassError(f"a pass of the job failed:\n{payload}")
                else:
                    finished = True
                    break
    finally:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if not finished:
        raise PassError(f"the process running a pass of the job died (exit code {child.returncode})")


def _child_main(message_fd: int, parent_pid: int) -> None:
    _exit_with_parent(parent_pid)
    make_dataset, config, shards, parts, address, level, fmt = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=logging.WARNING, format=fmt or logging.BASIC_FORMAT)
    logging.getLogger("instseg").setLevel(level)
    import ray

    with os.fdopen(message_fd, "wb") as messages:
        def send(kind: str, payload: Any) -> None:
            pickle.dump((kind, payload), messages)
            messages.flush()

        try:
            ray.init(address=address, logging_level=logging.WARNING)
            for batch in make_dataset(config, shards, parts).iter_batches(batch_format="pyarrow", batch_size=None):
                send("batch", batch)
            send("done", None)
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
            send("error", traceback.format_exc())
            raise SystemExit(1) from None
        finally:
            ray.shutdown()


def _exit_with_parent(parent_pid: int) -> None:
    """Exit this process as soon as its parent is gone (checked every second)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="instseg-parent-watch", daemon=True).start()


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
