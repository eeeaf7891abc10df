"""Training curves: TensorBoard event files and ``train_curves.png`` (issue 17 item 5).

A tiny PP-YOLOE_seg trains 2 epochs of 2 steps on the synthetic shapes dataset (seconds). Its event
file is read back with TensorBoard's own reader (``tensorboard`` package: record framing and both
CRCs checked, Event protobufs parsed by protobuf), and every scalar is compared with what the run
says elsewhere: each step's loss with ``train.log``'s progress lines, each epoch's mean loss with
those steps, each evaluation's mask AP with ``train_result.json``. Resuming from epoch 1's
checkpoint keeps epoch 1's scalars and logs epoch 2 once. Ray Train: rank 0 alone writes them.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from instseg_core.config import apply_overrides, load_config
from instseg_core.training.curves import CURVES_PNG, EVENT_FILE, LOG_DIR, TrainingCurves
from instseg_core.training.engine import train
from instseg_core.training.tfevents import EventFileWriter, crc32c, read_scalars

from conftest import missing_tool

try:  # the independent reader: TensorBoard's own (the test extra installs it)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
except ImportError:
    EventAccumulator = LegacyEventFileLoader = None


@pytest.fixture(autouse=True)
def _tensorboard_installed() -> None:
    if EventAccumulator is None:
        missing_tool("tensorboard not installed (pip install -e '.[test]')")

LOSS_TERMS = {"loss", "loss_cls", "loss_iou", "loss_dfl", "loss_l1", "loss_mask"}  # PP-YOLOE_seg's
MPL_LINE_COLOURS_BGR = [np.array([180, 119, 31]), np.array([14, 127, 255])]  # tab:blue, tab:orange as OpenCV reads them


def _cfg(dataset: Path, out: Path, *extra: str) -> dict:
    return apply_overrides(load_config("PP-YOLOE_seg-S"), [
        "Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={out}", "Train.num_classes=4",
        "Train.epochs_iters=2", "Train.batch_size=2", "Train.input_size=64", "Train.warmup_steps=1",
        "Train.log_interval=1", "Train.pretrain_weight_path=None",
        "Train.arch={'width_mult': 0.125, 'num_protos': 16}", *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from instseg_core.datasets.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("curves") / "shapes", num_train=4, num_val=2, size=64, seed=5)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("curves_run") / "out"
    return out, train(_cfg(dataset, out))


def _accumulated(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def _raw_scalars(path: Path) -> list[tuple[str, int, float]]:
    """Every scalar value in file order, duplicates included (TensorBoard's loader of the Event
    protos as written: no purging, no migration of ``simple_value`` to tensors)."""
    return [(v.tag, e.step, v.simple_value) for e in LegacyEventFileLoader(str(path)).Load() for v in e.summary.value]


@pytest.mark.slow
def test_training_writes_tensorboard_scalars_and_a_curves_png(trained):
    out, record = trained
    assert record["visualdl_log"] == LOG_DIR  # PaddleX leaves it "": here the dir of the event file
    log_dir = out / record["visualdl_log"]
    assert sorted(p.name for p in log_dir.iterdir()) == [EVENT_FILE]
    first = next(iter(LegacyEventFileLoader(str(log_dir / EVENT_FILE)).Load()))
    assert first.file_version == "brain.Event:2"

    acc = _accumulated(log_dir)
    tags = set(acc.Tags()["scalars"])
    assert tags == ({f"train/{t}" for t in LOSS_TERMS} | {f"epoch/{t}" for t in LOSS_TERMS}
                    | {"train/lr", "eval/mask_AP", "eval/box_AP"}), tags

    # 4 images, batch 2, log_interval 1: every step logged, at the global step; same numbers as train.log
    logged = [{"lr": m.group(1), **dict(kv.split(": ") for kv in m.group(2).split(", "))}
              for m in re.finditer(r"step \[\d+/2\] lr (\S+) (.*?) \|", (out / "train.log").read_text())]
    assert len(logged) == 4
    loss = _series(acc, "train/loss")
    assert sorted(loss) == [1, 2, 3, 4]
    for step, line in enumerate(logged, start=1):
        for term in LOSS_TERMS:
            assert _series(acc, f"train/{term}")[step] == pytest.approx(float(line[term]), abs=6e-5), (step, term)
        assert _series(acc, "train/lr")[step] == pytest.approx(float(line["lr"]), rel=1e-5, abs=1e-12)

    # per epoch: the mean of the epoch's steps, at the 1-based epoch
    epoch_loss = _series(acc, "epoch/loss")
    assert sorted(epoch_loss) == [1, 2]
    assert epoch_loss[1] == pytest.approx((loss[1] + loss[2]) / 2, rel=1e-5)
    assert epoch_loss[2] == pytest.approx((loss[3] + loss[4]) / 2, rel=1e-5)

    # every epoch is evaluated (eval_interval 1): the same AP as train_result.json's entries
    ap = _series(acc, "eval/mask_AP")
    assert ap == pytest.approx({2: record["models"]["last_1"]["score"], 1: record["models"]["last_2"]["score"]},
                               abs=1e-6)
    assert sorted(_series(acc, "eval/box_AP")) == [1, 2]

    # the PNG: the expected size, not blank, data lines in both panels: matplotlib's first two
    # colours are the first two loss terms on the left and mask/box AP on the right (there, both
    # 0 after 2 epochs from scratch, one line covers the other), far more pixels than a legend's
    import cv2

    png = cv2.imread(str(out / CURVES_PNG))
    assert png is not None and png.shape == (420, 1100, 3)
    assert (png.min(axis=2) < 200).mean() > 0.02  # ink, not an empty canvas
    coloured = np.zeros(png.shape[:2], bool)
    for colour in MPL_LINE_COLOURS_BGR:
        coloured |= np.abs(png.astype(int) - colour).max(axis=2) < 40
    assert coloured[:, :550].sum() > 600 and coloured[:, 550:].sum() > 600


@pytest.mark.slow
def test_a_resumed_run_keeps_earlier_epochs_and_logs_each_step_once(trained, dataset, tmp_path):
    out, record = trained
    first = _raw_scalars(out / LOG_DIR / EVENT_FILE)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # epoch 2 was logged, but the run resumes from epoch 1's checkpoint (what Ray Train does when a
    # worker died before epoch 2's checkpoint was registered): epoch 2 is trained and logged again
    again = train(_cfg(dataset, copy), resume_path=str(copy / "0"))
    assert again["visualdl_log"] == LOG_DIR
    assert sorted(p.name for p in (copy / LOG_DIR).iterdir()) == [EVENT_FILE]
    resumed = _raw_scalars(copy / LOG_DIR / EVENT_FILE)
    keys = [(tag, step) for tag, step, _ in resumed]
    assert len(keys) == len(set(keys))  # nothing logged twice
    assert sorted(keys) == sorted((tag, step) for tag, step, _ in first)
    # epoch 1's values are kept as they were; epoch 2 retrains from the same state, so the same numbers
    before, after = {(t, s): v for t, s, v in first}, {(t, s): v for t, s, v in resumed}
    for key in before:
        assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), key
    assert (copy / CURVES_PNG).stat().st_size > 10_000


def test_a_fresh_run_in_the_same_output_starts_a_new_history(tmp_path):
    old = tmp_path / LOG_DIR / EVENT_FILE
    with EventFileWriter(old) as w:
        w.add_scalars(7, {"train/loss": 1.0})
    curves = TrainingCurves(tmp_path)
    curves.close()
    assert read_scalars(old) == []
    assert [e.file_version for e in LegacyEventFileLoader(str(old)).Load()] == ["brain.Event:2"]


def test_event_records_use_crc32c_and_any_int64_step(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    path = tmp_path / "events.out.tfevents.test"
    with EventFileWriter(path) as w:
        w.add_scalars(0, {"a": 0.5})
        w.add_scalars(2**40, {"a": -1.5, "b/c": 3.25})
        w.add_scalars(-3, {"a": 2.0})
    raw = _raw_scalars(path)
    assert raw == [("a", 0, 0.5), ("a", 2**40, -1.5), ("b/c", 2**40, 3.25), ("a", -3, 2.0)]
    assert [(s.tag, s.step, s.value) for s in read_scalars(path)] == raw


@pytest.mark.slow
def test_ray_train_rank_0_writes_the_curves(ray_local, dataset, tmp_path):
    """Two Ray Train workers, one epoch: one event file, with rank 0's single step (2 of the 4
    images per worker, batch 2), the epoch's mean and its evaluation."""
    from pipelines.train import fine_tune_on_ray

    out = tmp_path / "out"
    fine_tune_on_ray(_cfg(dataset, out, "Train.epochs_iters=1"), num_workers=2, storage_path=str(tmp_path / "ray"),
                     name="curves")
    record = json.loads((out / "train_result.json").read_text())
    assert record["visualdl_log"] == LOG_DIR
    assert sorted(p.name for p in (out / LOG_DIR).iterdir()) == [EVENT_FILE]
    acc = _accumulated(out / LOG_DIR)
    loss = _series(acc, "train/loss")
    assert sorted(loss) == [1]
    assert _series(acc, "epoch/loss") == pytest.approx(loss, rel=1e-5)
    assert _series(acc, "eval/mask_AP") == pytest.approx({1: record["models"]["last_1"]["score"]}, abs=1e-6)
    assert (out / CURVES_PNG).stat().st_size > 10_000
