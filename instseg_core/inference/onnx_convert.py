"""Paddle graph -> ONNX, converted once per graph content and cached, in a child process.

paddle2onnx aborts the whole process (SIGABRT, not an exception) on an operator it cannot convert,
so the conversion runs in ``python -c`` of its own: a failure is a :class:`ConversionError` with the
converter's last lines, and the caller (a predictor, a Ray actor) lives on.

The cache key is the SHA-256 of the graph and weights files plus the converter version and opset,
so a re-exported dir or a new paddle2onnx converts again. Files live in ``<graph dir>/.onnx/`` when
it is writable, else in ``$INSTSEG_HOME/onnx/``. Concurrent processes (several actors on one node)
take a file lock: one converts, writes to a temporary name and renames; the others wait and reuse
its file. A failed conversion is remembered (``<key>.failed`` with the reason) so that every later
actor falls back at once instead of crashing the converter again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from instseg_core.inference.backends import missing_package
from instseg_core.io import cache_root, file_lock

log = logging.getLogger("instseg")

__all__ = ["ConversionError", "OPSET", "converter_version", "onnx_for"]

OPSET = 16
CONVERT_TIMEOUT_S = 900

# runs in the child: argv = graph, params ("" when the graph has none), output, opset
_CHILD = """
import sys
import paddle2onnx
graph, params, out, opset = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
paddle2onnx.export(graph, params, out, opset_version=opset, enable_onnx_checker=True, verbose=False)
"""


class ConversionError(RuntimeError):
    """A graph that paddle2onnx cannot convert (the message says why)."""


def converter_version() -> str:
    """The installed paddle2onnx version; ImportError with an install hint when it is missing."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("paddle2onnx")
    except PackageNotFoundError:
        raise missing_package("paddle2onnx") from None


def _digest(files: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def _cache_dir(graph: Path) -> Path:
    """``<graph dir>/.onnx`` when writable (the copy travels with the dir), else ``$INSTSEG_HOME/onnx``."""
    local = graph.parent / ".onnx"
    try:
        local.mkdir(exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=local, prefix=".probe-", delete=True)
        probe.close()
        return local
    except OSError:
        shared = cache_root() / "onnx"
        shared.mkdir(parents=True, exist_ok=True)
        return shared


def onnx_for(graph: str | os.PathLike, params: str | os.PathLike | None, *, opset: int = OPSET,
             timeout_s: float = CONVERT_TIMEOUT_S) -> Path:
    """The ONNX file of a Paddle graph (``.json`` PIR or ``.pdmodel``) and its weights, converting
    it on first use. Raises :class:`ConversionError` when the converter fails (also when an earlier
    process saw it fail on the same content), ImportError when paddle2onnx is missing."""
    graph = Path(graph)
    params_path = Path(params) if params and Path(params).is_file() else None
    version = converter_version()
    key = _digest([graph] + ([params_path] if params_path else []), f"paddle2onnx={version};opset={opset}")
    folder = _cache_dir(graph)
    target = folder / f"{graph.stem}-{key}.onnx"
    failed = folder / f"{graph.stem}-{key}.failed"
    # one converter per graph; the others wait, then reuse its file (or its failure)
    with file_lock(folder / f"{graph.stem}-{key}.lock", waiting=f"another process is converting {graph} to ONNX"):
        if target.is_file():
            return target
        if failed.is_file():
            raise ConversionError(failed.read_text(encoding="utf-8").strip())
        reason = _convert(graph, params_path, target, opset, timeout_s)
        if reason is not None:
            failed.write_text(reason + "\n", encoding="utf-8")
            raise ConversionError(reason)
        return target


def _convert(graph: Path, params: Path | None, target: Path, opset: int, timeout_s: float) -> str | None:
    """Convert in a child process into a temporary file, then rename; returns the failure reason or None."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    start = time.monotonic()
    cmd = [sys.executable, "-c", _CHILD, str(graph), str(params or ""), str(tmp), str(opset)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "GLOG_minloglevel": "2"})
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        return f"paddle2onnx did not finish converting {graph} within {timeout_s:.0f} s"
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        return f"paddle2onnx cannot convert {graph} ({_exit_text(proc.returncode)}): {_last_lines(proc)}"
    os.replace(tmp, target)
    log.info("converted %s to ONNX in %.1f s (%s)", graph, time.monotonic() - start, target)
    return None


def _exit_text(code: int) -> str:
    if code < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISE = ("error message summary", "fatalerror", "timeinfo", "signalinfo", "c++ traceback", "-----")


def _last_lines(proc: subprocess.CompletedProcess, n: int = 2) -> str:
    """The converter's telling lines: its own error lines if any (not the crash handler's banner),
    else the last few."""
    lines = [_ANSI.sub("", ln).strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()]
    lines = [ln for ln in lines if ln and not any(ln.lower().startswith(w) or w in ln.lower()[:30] for w in _NOISE)]
    errors = [ln for ln in lines if any(w in ln.lower() for w in ("error", "unsupported", "not support", "failed"))]
    return " | ".join((errors or lines)[-n:]) or "no output"
