"""Training checkpoints in PaddleDetection's file layout, readable without unpickling code.

A checkpoint ``<dir>/<name>.*`` is four files:

- ``.pdparams``: the weights to evaluate and export (the EMA weights when EMA is on), a plain
  structured-name -> array dict that ``paddle.load`` and official tools read;
- ``.pdema``: the raw training weights (what the optimizer updates); only with EMA;
- ``.pdopt``: the optimizer state, keyed by *structured* parameter names (Paddle keys it by
  auto-generated names such as ``conv2d_17.w_0`` that change with build order, so raw
  ``optimizer.state_dict()`` files do not survive a rebuild in another process);
- ``.pdstates``: epoch, global step, best AP, EMA update count, seed (arrays, so the safe reader loads it).

Everything is read back with :func:`instseg_core.modeling.weights.read_pdparams` (arrays and plain
containers only), also from URLs and S3.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.nn as nn

from instseg_core.modeling.weights import read_pdparams

SUFFIXES = (".pdparams", ".pdema", ".pdopt", ".pdstates")


def _numpy_state(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: (v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v)) for k, v in state.items()}


def _param_name_map(model: nn.Layer) -> dict[str, str]:
    """Paddle's generated parameter name -> structured name (``backbone.stem.conv.weight``)."""
    return {p.name: k for k, p in model.named_parameters()}


def optimizer_state_by_structured_name(opt: paddle.optimizer.Optimizer, model: nn.Layer) -> dict[str, np.ndarray]:
    """The optimizer's accumulators keyed ``<structured name>::<accumulator suffix>``."""
    names = sorted(_param_name_map(model).items(), key=lambda kv: -len(kv[0]))  # longest match first
    out: dict[str, np.ndarray] = {}
    for key, value in opt.state_dict().items():
        if not isinstance(value, paddle.Tensor):
            continue  # LR scheduler state: the schedule is recomputed from the step
        for pname, sname in names:
            if key.startswith(pname + "_"):
                out[f"{sname}::{key[len(pname) + 1:]}"] = value.numpy()
                break
        else:
            out[f"::{key}"] = value.numpy()  # e.g. master weights under AMP, kept verbatim
    return out


def restore_optimizer(opt: paddle.optimizer.Optimizer, model: nn.Layer, state: dict[str, np.ndarray]) -> int:
    """Inverse of :func:`optimizer_state_by_structured_name`; returns how many entries were set."""
    by_structured = {k: p for p, k in _param_name_map(model).items()}
    restored: dict[str, paddle.Tensor] = {}
    for key, arr in state.items():
        sname, _, suffix = key.partition("::")
        if not sname:
            restored[suffix] = paddle.to_tensor(arr)
        elif sname in by_structured:
            restored[f"{by_structured[sname]}_{suffix}"] = paddle.to_tensor(arr)
    if restored:
        opt.set_state_dict(restored)
    return len(restored)


def save_checkpoint(directory: str | os.PathLike, name: str, *, weights: dict[str, Any],
                    raw_weights: dict[str, Any] | None = None, optimizer_state: dict[str, np.ndarray] | None = None,
                    states: dict[str, Any] | None = None) -> Path:
    """Write ``<directory>/<name>.{pdparams,pdema,pdopt,pdstates}`` atomically (temp dir + rename)."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    paddle.save(_numpy_state(weights), str(tmp / f"{name}.pdparams"))
    if raw_weights is not None:
        paddle.save(_numpy_state(raw_weights), str(tmp / f"{name}.pdema"))
    if optimizer_state is not None:
        paddle.save(optimizer_state, str(tmp / f"{name}.pdopt"))
    if states is not None:
        paddle.save({k: np.asarray(v) for k, v in states.items()}, str(tmp / f"{name}.pdstates"))
    if final.exists():
        # keep anything else already there (e.g. an inference/ export) but replace our files
        for f in tmp.iterdir():
            os.replace(f, final / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, final)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` may be a ``.pdparams`` file or a directory holding exactly one; returns the file."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.pdparams"))
        if len(found) != 1:
            raise FileNotFoundError(f"resume checkpoint directory {str(p)!r} must hold exactly one .pdparams "
                                    f"file, found {[f.name for f in found]}")
        return found[0]
    if p.suffix != ".pdparams":
        p = p.with_suffix(".pdparams") if p.with_suffix(".pdparams").exists() else p
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found (give a .pdparams file or its directory)")
    return p


def load_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Read the four files of the checkpoint at ``path``; absent ones come back as empty dicts."""
    params = find_checkpoint(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    for suffix in SUFFIXES:
        f = params.with_suffix(suffix)
        out[suffix[1:]] = read_pdparams(f) if f.exists() else {}
    return out
