"""Helpers shared by the tests that compare models against the reference oracles.

The oracles live in ``shared/oracles/<model name>/`` next to the repository: ``state_dict.tsv``
(official state-dict names and shapes), ``input.npz``, ``expected.npz``, and the synthetic-weight
rule ``shared/oracles/weights_rule.py``. Tolerances are described in ``shared/oracles/README.md``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import pytest

ORACLES = Path(__file__).resolve().parents[2] / "shared" / "oracles"
ORACLE_FILES = ("state_dict.tsv", "expected.npz", "input.npz")


def oracle_dir(model_name: str) -> Path:
    """Folder of the oracle of ``model_name`` (e.g. ``"Mask-RT-DETR-S"``)."""
    return ORACLES / model_name


def oracle_available(model_name: str, files: tuple[str, ...] = ORACLE_FILES) -> bool:
    """True when every one of ``files`` exists in the oracle folder and ``weights_rule.py`` exists."""
    folder = oracle_dir(model_name)
    return all((folder / n).exists() for n in files) and (ORACLES / "weights_rule.py").exists()


def require_oracle(model_name: str, files: tuple[str, ...] = ORACLE_FILES) -> None:
    """Skip the calling test unless :func:`oracle_available` holds for ``model_name``."""
    if not oracle_available(model_name, files):
        pytest.skip(f"shared/oracles/{model_name} not available")


def mask_rtdetr_name(size: str) -> str:
    """Model / oracle folder name of a Mask-RT-DETR size (``"S"`` -> ``"Mask-RT-DETR-S"``)."""
    return f"Mask-RT-DETR-{size}"


def state_shapes(model_name: str, prefixes: str | tuple[str, ...] | None = None) -> dict[str, tuple]:
    """Names -> shapes of ``state_dict.tsv``, in file order; only keys starting with ``prefixes``
    (a string or a tuple of strings) when given."""
    out = {}
    for line in (oracle_dir(model_name) / "state_dict.tsv").read_text().splitlines()[1:]:
        k, s, _ = line.split("\t")
        if prefixes is None or k.startswith(prefixes):
            out[k] = tuple(int(x) for x in s.split(","))
    return out


def weights_rule() -> ModuleType:
    """The ``weights_rule`` module of the oracle folder (imported with the folder on ``sys.path``
    only for the import)."""
    sys.path.insert(0, str(ORACLES))
    try:
        import weights_rule as rule
    finally:
        sys.path.remove(str(ORACLES))
    return rule


def feature_error(exp, name: str, got: np.ndarray, reshape: bool = False) -> float:
    """Normalised error of ``got`` against the oracle feature ``name`` of ``exp`` (an opened
    ``expected.npz``): max|got-exp|/std(exp) for a full array, else the max of the summary errors
    (``<name>/mean``, ``<name>/std``, ``<name>/val`` at ``<name>/idx``) over ``<name>/std``.

    The shape of ``got`` must equal the expected one; with ``reshape`` it is reshaped to it
    instead (same number of elements required)."""
    if name in exp.files:
        e = exp[name]
        if reshape:
            got = got.reshape(e.shape)
        assert got.shape == e.shape, (name, got.shape, e.shape)
        return float(np.abs(got.astype(np.float64) - e).max()) / float(e.std())
    shape = tuple(int(v) for v in exp[name + "/shape"])
    if reshape:
        got = got.reshape(shape)
    assert got.shape == shape, (name, got.shape, shape)
    std = float(exp[name + "/std"])
    g = got.astype(np.float64)
    errs = [abs(g.mean() - float(exp[name + "/mean"])),
            abs(g.std() - std),
            float(np.abs(g.reshape(-1)[exp[name + "/idx"]] - exp[name + "/val"]).max())]
    return max(errs) / std


def nearest_rows(exp_rows: np.ndarray, got_rows: np.ndarray, tol: float, chunk: int = 64) -> np.ndarray:
    """For each row of ``exp_rows`` [N, ...], the index of the nearest row of ``got_rows`` [M, ...]
    (max-abs distance over the flattened row) when it lies within ``tol``, else -1 (int64 [N])."""
    e = np.asarray(exp_rows, np.float32).reshape(len(exp_rows), -1)
    g = np.asarray(got_rows, np.float32).reshape(len(got_rows), -1)
    assert e.shape[1] == g.shape[1], (e.shape, g.shape)
    out = np.full(len(e), -1, np.int64)
    if len(g) == 0:
        return out
    for start in range(0, len(e), chunk):  # [chunk, M, D] at a time
        d = np.abs(e[start:start + chunk, None, :] - g[None, :, :]).max(-1)
        best = d.argmin(1)
        out[start:start + chunk] = np.where(d[np.arange(len(best)), best] <= tol, best, -1)
    return out


def paired_feature_error(exp, name: str, got: np.ndarray, got_index: np.ndarray) -> float:
    """:func:`feature_error` of the rows of ``got`` paired with the oracle's rows: row ``r`` of the
    oracle feature ``name`` (its leading axis after dropping size-1 axes, e.g. the 300 queries of
    ``[1, 1, 300, 80]``) against ``got[got_index[r]]``; rows with ``got_index[r] == -1`` are left out.

    For a summary, the sampled values in paired rows are compared, and the mean and std (over all
    rows) only when every row is paired."""
    got_index = np.asarray(got_index)
    paired = got_index >= 0
    assert paired.any(), f"{name}: no paired row"
    shape = tuple(exp[name].shape) if name in exp.files else tuple(int(v) for v in exp[name + "/shape"])
    n = len(got_index)
    assert int(np.prod(shape)) % n == 0, (name, shape, n)
    row = int(np.prod(shape)) // n
    got = np.asarray(got)
    assert got.size % row == 0, (name, got.shape, shape)
    g = got.reshape(-1, row)
    aligned = g[np.where(paired, got_index, 0)].astype(np.float64)  # oracle order; unpaired rows unused
    if name in exp.files:
        e = exp[name].reshape(n, row)
        return float(np.abs(aligned[paired] - e[paired]).max()) / float(exp[name].std())
    std = float(exp[name + "/std"])
    idx = exp[name + "/idx"]
    keep = paired[idx // row]
    errs = [float(np.abs(aligned.reshape(-1)[idx[keep]] - exp[name + "/val"][keep]).max()) if keep.any() else 0.0]
    if paired.all():
        errs += [abs(aligned.mean() - float(exp[name + "/mean"])), abs(aligned.std() - std)]
    return max(errs) / std


def detection_misses(exp_rows: np.ndarray, got_rows: np.ndarray, pairs: list[tuple[int, int]],
                     boundaries: list[float], score_tol: float) -> tuple[list[int], list[int], list[float]]:
    """The rows left without a partner by :func:`match_rows`: (expected row indices, predicted row
    indices, scores of those of them not within ``score_tol`` of a decision boundary). The
    ``boundaries`` are the scores where a row enters or leaves the output (the score threshold,
    the lowest kept score of an output cut at top-k): a row there may flip in or out on another
    CPU's rounding (``shared/oracles/README.md`` rule 2)."""
    exp_miss = sorted(set(range(len(exp_rows))) - {i for i, _ in pairs})
    got_miss = sorted(set(range(len(got_rows))) - {j for _, j in pairs})
    scores = [float(exp_rows[i][1]) for i in exp_miss] + [float(got_rows[j][1]) for j in got_miss]
    off = [s for s in scores if not any(abs(s - b) <= score_tol for b in boundaries)]
    return exp_miss, got_miss, off


def oracle_model(model_name: str):
    """``build_model(model_name)`` with the oracle's deterministic weights, in eval mode."""
    import paddle

    from instseg_core.modeling.build import build_model

    model = build_model(model_name)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights_rule().fill(state_shapes(model_name)).items()})
    model.eval()
    return model


def run_dygraph(model, inputs: dict) -> dict:
    """Eval forward on numpy inputs; the output dict as numpy arrays."""
    import paddle

    with paddle.no_grad():
        out = model({k: paddle.to_tensor(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def match_rows(exp_rows: np.ndarray, got_rows: np.ndarray, *, score_tol: float = 1e-3,
               box_tol: float = 1.0) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of detection rows ``[class, score, x1, y1, x2, y2]``, from the
    highest expected score (the oracle README's rule 1): same class, ``|dscore| <= score_tol``,
    max ``|dcoordinate| <= box_tol``, the closest (box, else score) wins. Rows of only
    ``[class, score]`` (SOLOv2) match on class and score. Returns ``[(i_expected, j_got)]``."""
    exp_rows, got_rows = np.asarray(exp_rows, np.float64), np.asarray(got_rows, np.float64)
    pairs, used = [], set()
    for i in np.argsort(-exp_rows[:, 1], kind="stable"):
        best, best_d = None, None
        for j in range(len(got_rows)):
            if j in used or int(got_rows[j, 0]) != int(exp_rows[i, 0]):
                continue
            ds = abs(float(got_rows[j, 1] - exp_rows[i, 1]))
            db = float(np.abs(got_rows[j, 2:6] - exp_rows[i, 2:6]).max()) if exp_rows.shape[1] > 2 else 0.0
            d = db if exp_rows.shape[1] > 2 else ds
            if ds <= score_tol and db <= box_tol and (best_d is None or d < best_d):
                best, best_d = j, d
        if best is not None:
            used.add(best)
            pairs.append((int(i), best))
    return pairs


def mask_agrees(a: np.ndarray, b: np.ndarray) -> bool:
    """The oracle README's mask rule: the masks differ in at most max(1% of their union, 64) pixels."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    return int(np.count_nonzero(a ^ b)) <= max(0.01 * int(np.count_nonzero(a | b)), 64)


def instance_rows(inst) -> np.ndarray:
    """``[class, score, x1, y1, x2, y2]`` rows of an :class:`~instseg_core.structures.Instances`."""
    return np.concatenate([inst.class_ids[:, None].astype(np.float32), inst.scores[:, None].astype(np.float32),
                           np.asarray(inst.boxes, np.float32)], axis=1)


class DetectionMatch(NamedTuple):
    unmatched: int  # expected rows without a partner
    mask_failures: int  # matched pairs whose masks break :func:`mask_agrees`
    worst_iou: float  # lowest mask IoU over matched pairs
    max_dscore: float
    max_dbox: float


def match_with_masks(exp_rows, exp_masks, got_rows, got_masks, *, score_tol: float = 1e-3,
                     box_tol: float = 1.0) -> DetectionMatch:
    """:func:`match_rows` (rows of 2 or 6 columns), then the masks and score/box differences of the pairs."""
    pairs = match_rows(exp_rows, got_rows, score_tol=score_tol, box_tol=box_tol)
    worst_iou, max_ds, max_db, failures = 1.0, 0.0, 0.0, 0
    for i, j in pairs:
        max_ds = max(max_ds, abs(float(got_rows[j, 1]) - float(exp_rows[i, 1])))
        if np.shape(exp_rows)[1] > 2:
            max_db = max(max_db, float(np.abs(np.asarray(got_rows[j, 2:6], np.float64) - exp_rows[i, 2:6]).max()))
        a, b = np.asarray(exp_masks[i]) > 0.5, np.asarray(got_masks[j]) > 0.5
        union = int(np.count_nonzero(a | b))
        worst_iou = min(worst_iou, 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union)
        failures += not mask_agrees(a, b)
    return DetectionMatch(len(exp_rows) - len(pairs), failures, worst_iou, max_ds, max_db)
