"""Load official PaddlePaddle ``.pdparams`` weight files safely.

``.pdparams`` files are pickles written by ``paddle.save``. In Paddle 3.3.1, ``paddle.save(
layer.state_dict(), path)`` writes (protocol 4 by default) a plain ``dict`` of structured name ->
``numpy.ndarray``; the arrays are pickled through ``numpy._core.multiarray._reconstruct``,
``numpy.ndarray`` and ``numpy.dtype`` (``numpy.core.multiarray`` with NumPy < 2). Tensors saved
*inside other containers* (or on their own) are pickled as ``builtins.tuple`` of
``(tensor_name, ndarray)``. With protocol 2, ``bytes`` go through ``_codecs.encode``. Older files
may carry a ``"StructuredToParameterName@@"`` entry (a str -> str map), which is not a weight.

Reading never runs code from the file: :class:`_SafeUnpickler` resolves only an allow-list of
globals (NumPy array reconstruction, builtin containers, ``collections.OrderedDict``); anything
else raises :class:`WeightsError` naming the forbidden global.

``source`` may be a local path, an ``http(s)://`` URL (downloaded once into
``cache_root()/"weights"``, atomically: :func:`instseg_core.io.cached_fetch`), an ``s3://`` URI
(via fsspec/s3fs; endpoint from the argument, else as :class:`instseg_core.io.S3Options` finds it)
or the raw bytes of a file.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instseg_core.inference.download import DownloadError, download_file
from instseg_core.io import S3Options, cache_root, cached_fetch, read_uri

__all__ = ["LoadReport", "WeightsError", "load_weights", "read_pdparams"]

logger = logging.getLogger("instseg")

STRUCTURED_NAME_KEY = "StructuredToParameterName@@"

# (module, name) pairs a .pdparams pickle may reference. All are pure data constructors.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(mod, name)
     for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]  # protocol 5
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("builtins", n) for n in ("tuple", "list", "dict", "set", "frozenset", "complex", "bytearray")]
    + [("__builtin__", n) for n in ("tuple", "list", "dict", "set", "frozenset", "complex")]  # py2 files
    + [("collections", "OrderedDict"), ("_codecs", "encode")]  # _codecs.encode: protocol-2 bytes
)


class WeightsError(ValueError):
    """A weights file cannot be read, is unsafe, or does not fit the model."""


@dataclass
class LoadReport:
    """Outcome of :func:`load_weights`.

    ``missing``: model keys absent from the file (left at their current values);
    ``unexpected``: file keys the model does not have (ignored);
    ``loaded``: number of tensors set; ``skipped``: keys skipped for a shape mismatch
    (only with ``strict_shapes=False``).
    """

    missing: list[str]
    unexpected: list[str]
    loaded: int
    skipped: list[str] = field(default_factory=list)


def _bytearray_from_data(*args: Any) -> bytearray:
    """``bytearray`` for pickles, from data only: ``bytearray(n)`` would let a 50-byte file make
    the reader allocate ``n`` bytes before anything is checked."""
    if args and not isinstance(args[0], (bytes, bytearray, memoryview, str)):
        raise WeightsError(f"refusing to load weights: bytearray({type(args[0]).__name__}) in the pickle "
                           f"(only bytearray(data) is allowed)")
    return bytearray(*args)


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "bytearray" and module in ("builtins", "__builtin__"):
            return _bytearray_from_data
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise WeightsError(
            f"refusing to load weights: the pickle references forbidden global {module}.{name} "
            f"(a .pdparams file holds only arrays; this file may be malicious or not a weights file)")

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsError(f"refusing to load weights: unsupported persistent id {pid!r} "
                           f"(not a paddle.save file; torch checkpoints are not supported)")


# ----------------------------------------------------------------------------------- reading


def read_pdparams(source: str | os.PathLike | bytes, *, s3_endpoint: str | None = None
                  ) -> dict[str, np.ndarray]:
    """Read a ``.pdparams`` file into ``{name: ndarray}`` without executing code from it.

    Nested containers are flattened with ``.``-joined keys (list items by index); tensors pickled
    as ``(name, ndarray)`` tuples become their array; non-array leaves (and the
    ``StructuredToParameterName@@`` map) are dropped.

    Raises:
        WeightsError: unreadable source, not a pickle, forbidden content, or no arrays in it.
    """
    data, where = _read_source(source, s3_endpoint=s3_endpoint)
    try:
        obj = _SafeUnpickler(io.BytesIO(data)).load()
    except WeightsError as e:
        raise WeightsError(f"{where}: {e}") from None
    except Exception as e:  # UnpicklingError, EOFError, TypeError from bad REDUCE args, ...
        raise WeightsError(f"{where} is not a valid .pdparams pickle ({type(e).__name__}: {e})") from None
    out: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    if _is_named_tensor(obj):  # paddle.save(tensor)
        out[obj[0]] = obj[1]
    else:
        _flatten(obj, "", out, dropped)
    if dropped:
        logger.debug("%s: ignored %d non-array entries: %s", where, len(dropped), dropped[:10])
    if not out:
        raise WeightsError(f"{where} holds no arrays (top-level {type(obj).__name__}); "
                           f"is it a paddle.save file of a state dict?")
    return out


def _is_named_tensor(obj: Any) -> bool:
    return (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str)
            and isinstance(obj[1], np.ndarray))


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], dropped: list[str]) -> None:
    if isinstance(obj, dict):
        items = ((str(k), v) for k, v in obj.items() if k != STRUCTURED_NAME_KEY)
    elif isinstance(obj, (list, tuple)) and not _is_named_tensor(obj):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        if _is_named_tensor(obj):
            obj = obj[1]
        if isinstance(obj, np.generic):
            obj = np.asarray(obj)
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            out[prefix] = obj
        else:
            dropped.append(prefix)
        return
    for key, value in items:
        _flatten(value, f"{prefix}.{key}" if prefix else key, out, dropped)


def _read_source(source: str | os.PathLike | bytes, *, s3_endpoint: str | None) -> tuple[bytes, str]:
    """The raw bytes of ``source`` and a description of it for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "weights bytes"
    if not isinstance(source, (str, os.PathLike)):
        raise WeightsError(f"weights source must be a path, URL or bytes, got {type(source).__name__}")
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    scheme = urllib.parse.urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in ("http", "https"):
        path = _download_cached(text)
        return _read_local(path, text), text
    if scheme in ("s3", "s3a"):
        return _read_s3(text, s3_endpoint), text
    if scheme == "file":
        text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    elif scheme:
        raise WeightsError(f"unsupported weights URL scheme {scheme!r} in {text!r}; "
                           f"use a local path, http(s)://, s3:// or bytes")
    return _read_local(Path(text).expanduser(), text), text


def _read_local(path: Path, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {where}") from None
    except OSError as e:
        raise WeightsError(f"cannot read weights file {where}: {e}") from None


def _read_s3(uri: str, endpoint: str | None) -> bytes:
    try:
        return read_uri(uri, S3Options.from_env(endpoint))
    except FileNotFoundError:
        raise WeightsError(f"weights object not found: {uri}") from None
    except ImportError as e:  # pragma: no cover - s3fs is a core dependency
        raise WeightsError(f"reading {uri} needs s3fs ({e})") from None
    except Exception as e:  # botocore / aiohttp errors
        raise WeightsError(f"cannot read {uri} ({type(e).__name__}: {e})") from None


def _download_cached(url: str, *, timeout: float = 60, retries: int = 3) -> Path:
    """``url`` downloaded into ``cache_root()/"weights"`` (reused if already there)."""
    base = os.path.basename(urllib.parse.urlsplit(url).path) or "weights.pdparams"
    base = re.sub(r"[^A-Za-z0-9._+-]", "_", base).lstrip(".") or "weights.pdparams"
    cache_dir = cache_root() / "weights"
    try:
        return cached_fetch(url, "weights", lambda dest: download_file(url, dest, timeout=timeout, retries=retries),
                            name=base)
    except DownloadError as e:
        raise WeightsError(str(e)) from None
    except OSError as e:
        if not cache_dir.is_dir():
            raise WeightsError(f"cannot create weights cache dir {cache_dir}: {e}; "
                               f"set INSTSEG_HOME to a writable directory") from None
        raise WeightsError(f"writing {url} into {cache_dir} failed: {e}") from None


# ----------------------------------------------------------------------------------- loading


def _numpy_dtype(tensor: Any) -> np.dtype | None:
    """The NumPy dtype matching a paddle tensor's dtype, or None (e.g. bfloat16)."""
    name = str(tensor.dtype).rsplit(".", 1)[-1]  # "paddle.float32" -> "float32"
    if name == "bool":
        return np.dtype(bool)
    try:
        return np.dtype(name)
    except TypeError:
        return None


def load_weights(model: Any, source: str | os.PathLike | bytes | dict, *, strict_shapes: bool = True,
                 s3_endpoint: str | None = None) -> LoadReport:
    """Load ``source`` (see :func:`read_pdparams`; an already-read dict works too) into ``model``.

    Keys are matched against ``model.state_dict()``. Extra file keys are reported as
    ``unexpected`` and model keys absent from the file as ``missing``; neither is an error. Arrays
    are cast to each parameter's dtype. A shape mismatch raises :class:`WeightsError` naming the
    key(s) and both shapes, unless ``strict_shapes=False``: then those keys are skipped and listed
    in ``report.skipped``.
    """
    if isinstance(source, dict):
        weights = dict(source)
        where = "weights dict"
    else:
        weights = read_pdparams(source, s3_endpoint=s3_endpoint)
        where = source if isinstance(source, (str, os.PathLike)) else "weights bytes"
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    to_set: dict[str, np.ndarray] = {}
    for key, tensor in own.items():
        if key not in weights:
            continue
        arr = np.asarray(weights[key])
        want = tuple(int(d) for d in tensor.shape)
        if tuple(arr.shape) != want:
            mismatched.append((key, tuple(arr.shape), want))
            continue
        dtype = _numpy_dtype(tensor)
        if dtype is not None and arr.dtype != dtype:
            arr = arr.astype(dtype)
        to_set[key] = arr
    if mismatched and strict_shapes:
        lines = "; ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:20])
        more = f" (and {len(mismatched) - 20} more)" if len(mismatched) > 20 else ""
        raise WeightsError(f"{where}: shape mismatch for {len(mismatched)} key(s): {lines}{more}; "
                           f"pass strict_shapes=False to skip them (e.g. a different num_classes)")
    if to_set:
        with warnings.catch_warnings():  # paddle warns per key absent from the dict: in report.missing
            warnings.filterwarnings("ignore", message="Skip loading for", category=UserWarning)
            model.set_state_dict(to_set)
    report = LoadReport(missing=missing, unexpected=unexpected, loaded=len(to_set),
                        skipped=[k for k, _, _ in mismatched])
    logger.info("weights %s: loaded %d/%d tensors, %d missing, %d unexpected, %d skipped (shape)",
                where, report.loaded, len(own), len(missing), len(unexpected), len(report.skipped))
    return report
