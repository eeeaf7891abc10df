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

import importlib
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import traceback
from typing import Any, BinaryIO, Iterator

import pyarrow as pa

# messages from the child: a kind byte and a length-prefixed payload (no pickle: nothing here
# deserialises code): b"B" an Arrow IPC stream of one batch, b"E" a traceback, b"D" done
_HEADER = struct.Struct(">cQ")


class PassError(RuntimeError):
    """The pass's process failed; the message holds its traceback."""


def run_pass_in_child(make_dataset: str, config: dict[str, Any], shards: list[dict[str, Any]],
                      parts: dict[str, list[str]]) -> Iterator[pa.Table]:
    """Run ``make_dataset(config, shards, parts)`` (``"module:function"``, returning a lazy Ray
    Dataset; the arguments are JSON values) in a new Python process (``python -m pipelines.passes``:
    it never imports the caller's main script) joined to this process's Ray cluster, and yield the
    tables that iterating the Dataset yields. Raises :class:`PassError` if the child fails or dies."""
    import ray

    root = logging.getLogger()
    fmt = root.handlers[0].formatter._fmt if root.handlers and root.handlers[0].formatter else None  # noqa: SLF001
    job = {"make_dataset": make_dataset, "config": config, "shards": shards, "parts": parts,
           "address": ray.get_runtime_context().gcs_address,
           "level": logging.getLogger("instseg").getEffectiveLevel(), "format": fmt}
    read_fd, write_fd = os.pipe()  # the child's messages; its stdout/stderr stay the job's log
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # this process's imports
    child = subprocess.Popen([sys.executable, "-m", "pipelines.passes", str(write_fd), str(os.getpid())],
                             stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
    os.close(write_fd)
    finished = False
    try:
        with child.stdin as stdin:
            stdin.write(json.dumps(job).encode("utf-8"))
        with os.fdopen(read_fd, "rb") as messages:
            while (message := _receive(messages)) is not None:
                kind, payload = message
                if kind == b"B":
                    yield pa.ipc.open_stream(payload).read_all()
                elif kind == b"E":
                    raise PassError(f"a pass of the job failed:\n{payload.decode('utf-8', 'replace')}")
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


def _receive(stream: BinaryIO) -> tuple[bytes, bytes] | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the child is gone
    kind, size = _HEADER.unpack(header)
    payload = stream.read(size)
    return (kind, payload) if len(payload) == size else None


def _send(stream: BinaryIO, kind: bytes, payload: bytes) -> None:
    stream.write(_HEADER.pack(kind, len(payload)) + payload)
    stream.flush()


def _arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _child_main(message_fd: int, parent_pid: int) -> None:
    _exit_with_parent(parent_pid)
    job = json.load(sys.stdin)
    logging.basicConfig(level=logging.WARNING, format=job["format"] or logging.BASIC_FORMAT)
    logging.getLogger("instseg").setLevel(job["level"])
    module, _, name = job["make_dataset"].partition(":")
    make_dataset = getattr(importlib.import_module(module), name)
    import ray

    with os.fdopen(message_fd, "wb") as messages:
        try:
            ray.init(address=job["address"], logging_level=logging.WARNING)
            dataset = make_dataset(job["config"], job["shards"], job["parts"])
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                _send(messages, b"B", _arrow_bytes(batch))
            _send(messages, b"D", b"")
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
            _send(messages, b"E", traceback.format_exc().encode("utf-8"))
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
