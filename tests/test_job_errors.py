"""Every job entry point reports a user's mistake as one ``error:`` line with exit code 2, before
Ray starts and without a traceback (``--debug`` shows it): ``jobs.evaluate``, ``jobs.train`` and
``jobs.validate_dataset`` (``jobs.batch_predict`` is covered in test_batch_robustness.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MODEL_DIR = str(REPO / "samples" / "model")  # the demo model: 4 labels


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A small dataset in PaddleX's layout with the demo model's 4 categories."""
    from instseg_core.datasets.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("ds") / "shapes", num_train=4, num_val=2, size=64, seed=1)


def _run(module: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args, "--ray-address", "local"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "INSTSEG_HOME": str(tmp_path / "home")})


def _assert_one_line(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr, proc.stderr[-3000:]


def test_evaluate_mistakes(shapes, tmp_path):
    three = tmp_path / "three"
    import shutil

    shutil.copytree(shapes, three)
    ann = three / "annotations" / "instance_val.json"
    gt = json.loads(ann.read_text())
    gt["categories"] = gt["categories"][:3]
    ann.write_text(json.dumps(gt))
    out = tmp_path / "eval"
    cases = [
        (["--dataset-dir", str(three)], "the model has 4 labels but"),
        (["--dataset-dir", str(tmp_path / "nowhere")], "dataset:"),
        (["--dataset-dir", str(shapes), "--threshold", "2"], "threshold"),
        (["--dataset-dir", str(shapes), "--batch-size", "0"], "batch_size must be a positive integer"),
        (["--dataset-dir", str(shapes), "--model-dir", str(tmp_path / "no_model")], "model:"),
    ]
    for extra, words in cases:
        args = ["--model-dir", MODEL_DIR, "--output", str(out)] + extra
        _assert_one_line(_run("jobs.evaluate", args, tmp_path), words)
        failed = json.loads((out / "evaluate_result.json").read_text())  # PaddleX's failure record
        assert failed["done_flag"] is False and words.split(":")[0] in failed["err_msg"]
    proc = _run("jobs.evaluate", ["--model-dir", MODEL_DIR, "--output", str(out), "--dataset-dir", str(three),
                                  "--debug"], tmp_path)
    assert "Traceback" in proc.stderr and "LabelMismatchError" in proc.stderr


def test_train_mistakes(shapes, tmp_path):
    base = ["-c", "PP-YOLOE_seg-S", "--storage-path", str(tmp_path / "runs"), "-o", f"Global.output={tmp_path / 'o'}"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["-o", f"Global.dataset_dir={shapes}", "-o", "Train.num_classes=5"],
         "Train.num_classes=5 but"),
        (["-o", f"Global.dataset_dir={tmp_path / 'nowhere'}", "-o", "Train.num_classes=4"], "dataset:"),
        (["-o", f"Global.dataset_dir={shapes}", "-o", "Train.epochs_iters=0"], "Train.epochs_iters must be"),
        (["-o", f"Global.dataset_dir={shapes}", "-o", "Train.num_classes=4", "--num-workers", "0"], "--num-workers"),
        (["-o", f"Global.dataset_dir={shapes}", "-o", "Train.num_classes=4", "--storage-path", str(a_file)],
         "is a file"),
        (["-o", "Global"], "malformed override"),
    ]
    for extra, words in cases:
        _assert_one_line(_run("jobs.train", base + extra, tmp_path), words)
    proc = _run("jobs.train", ["-c", "No-Such-Model", "--storage-path", str(tmp_path / "runs")], tmp_path)
    _assert_one_line(proc, "No-Such-Model")


def test_validate_dataset_mistakes(shapes, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--dataset", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")], "dataset:"),
        (["--dataset", str(shapes), "--output", str(a_file)], "is a file"),
        (["--dataset", str(shapes), "--output", str(tmp_path / "o"), "--batch-size", "0"], "--batch-size"),
    ]
    for extra, words in cases:
        _assert_one_line(_run("jobs.validate_dataset", extra, tmp_path), words)
