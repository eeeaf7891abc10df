"""Resuming the training engine from a checkpoint older than the newest one in ``Global.output``.

That is what Ray Train does when a worker dies after rank 0 wrote an epoch's checkpoint and
``train_result.json`` but before the checkpoint was reported: the new worker group resumes from
the previous reported checkpoint and trains that epoch again. The output must then look as if the
run had never died (each epoch listed once in ``train_result.json``, no half-written best model).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from instseg_core.config import apply_overrides, load_config
from instseg_core.datasets.synthetic import make_dataset
from instseg_core.training.engine import train


def _cfg(dataset: Path, out: Path) -> dict:
    return apply_overrides(load_config("PP-YOLOE_seg-S"), [
        "Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={out}", "Train.num_classes=4",
        "Train.epochs_iters=2", "Train.batch_size=4", "Train.input_size=64", "Train.warmup_steps=1",
        "Train.pretrain_weight_path=None", "Train.arch={'width_mult': 0.125, 'num_protos': 16}"])


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_lists_each_epoch_once(tmp_path):
    dataset = make_dataset(tmp_path / "shapes", num_train=4, num_val=2, size=64, seed=5)
    out = tmp_path / "out"
    cfg = _cfg(dataset, out)
    first = train(cfg)
    assert [first["models"][f"last_{i}"].get("pdparams") for i in (1, 2, 3)] == ["1/1.pdparams", "0/0.pdparams", None]

    files = _files(out)
    # epoch 1's checkpoint and record exist, but the run resumes from epoch 0's (the last reported);
    # the killed process was also exporting a new best model (half written)
    (out / "best_model.tmp" / "inference").mkdir(parents=True)
    (out / "best_model.tmp" / "best_model.pdparams").write_bytes(b"partial")
    again = train(cfg, resume_path=str(out / "0"))
    assert "resumed from" in (out / "train.log").read_text()
    assert [again["models"][f"last_{i}"].get("pdparams") for i in (1, 2, 3)] == ["1/1.pdparams", "0/0.pdparams", None]
    assert again == json.loads((out / "train_result.json").read_text())
    # the same epoch trained again from the same state: the same record, scores included, and files
    assert again == first
    assert _files(out) == files


def test_killed_best_model_swap_is_undone(tmp_path):
    """Killed between the two renames of the best-model swap: the previous best model comes back."""
    from instseg_core.training.hooks import recover_best_model as _recover_best_model

    (tmp_path / "best_model.old").mkdir()
    (tmp_path / "best_model.old" / "best_model.pdparams").write_bytes(b"previous")
    (tmp_path / "best_model.tmp").mkdir()
    _recover_best_model(tmp_path)
    assert _files(tmp_path) == ["best_model/best_model.pdparams"]
    (tmp_path / "best_model.old").mkdir()  # both there: the swap finished, only the cleanup was missed
    _recover_best_model(tmp_path)
    assert _files(tmp_path) == ["best_model/best_model.pdparams"]


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
