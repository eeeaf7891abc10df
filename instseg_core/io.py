"""Local files written the safe way: all at once (temp file in the same directory + rename), with
the permissions an ordinary ``open(path, "w")`` would give (``0666 & ~umask``; ``mkstemp``'s 0600
would make outputs unreadable to the rest of a team)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "current_umask"]


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is racy)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, fsync: bool = False,
                 publish: Callable[[Path, Path], Any] | None = None) -> None:
    """Write ``path`` through ``write(binary_file)`` into a hidden temp sibling, then move it in
    place (``os.replace``, or ``publish(tmp, path)``, e.g. to back the old file up first): readers
    never see a partial file, and a failure leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        (publish or os.replace)(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
