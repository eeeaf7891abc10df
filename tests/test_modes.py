"""`instseg run -c CONFIG -o ...` end to end, as a user runs it (a subprocess)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED

COCO = SHARED / "data" / "coco_tiny_val2017"
LABELME = SHARED / "data" / "labelme_instance_segmentation" / "examples" / "instance_segmentation"


def _run(*overrides, config="MaskRCNN-ResNet50-FPN"):
    args = [sys.executable, "-m", "instseg_core", "run", "-c", config]
    for o in overrides:
        args += ["-o", o]
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_check_dataset_mode(tmp_path):
    if not COCO.is_dir():
        pytest.skip("shared COCO data not present")
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    mini = json.loads((COCO / "annotations" / "instances_val2017_mini8.json").read_text())
    for img in mini["images"]:
        shutil.copy(COCO / "val2017" / img["file_name"], root / "images")
    for split in ("train", "val"):
        (root / "annotations" / f"instance_{split}.json").write_text(json.dumps(mini))
    out = tmp_path / "out"
    proc = _run("Global.mode=check_dataset", f"Global.dataset_dir={root}", f"Global.output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "check_dataset_result.json").read_text())
    assert result["done_flag"] and result["check_pass"] and result["attributes"]["num_classes"] == len(mini["categories"])


def test_labelme_convert_then_check(tmp_path):
    if not LABELME.is_dir():
        pytest.skip("shared LabelMe data not present")
    root = tmp_path / "lm"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    names = sorted(p.stem for p in (LABELME / "data_annotated").glob("*.json"))
    for n in names:
        shutil.copy(LABELME / "data_annotated" / f"{n}.jpg", root / "images")
        shutil.copy(LABELME / "data_annotated" / f"{n}.json", root / "annotations")
    (root / "train_anno_list.txt").write_text("".join(f"annotations/{n}.json\n" for n in names[:2]))
    (root / "val_anno_list.txt").write_text(f"annotations/{names[2]}.json\n")
    out = tmp_path / "out"
    proc = _run("Global.mode=check_dataset", f"Global.dataset_dir={root}", f"Global.output={out}",
                "CheckDataset.convert.enable=True", "CheckDataset.convert.src_dataset_type=LabelMe")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "annotations" / "instance_train.json").is_file()
    result = json.loads((out / "check_dataset_result.json").read_text())
    assert result["check_pass"] is True and result["attributes"]["train_samples"] > 0


def test_failures_write_done_flag_false(tmp_path):
    out = tmp_path / "out"
    proc = _run("Global.mode=check_dataset", f"Global.dataset_dir={tmp_path / 'missing'}", f"Global.output={out}")
    assert proc.returncode == 1
    rec = json.loads((out / "check_dataset_result.json").read_text())
    assert rec["done_flag"] is False and rec["err_type"] and "missing" in rec["err_msg"]
    proc = _run("Global.mode=train", f"Global.output={out}")
    assert proc.returncode == 1 and json.loads((out / "train_result.json").read_text())["done_flag"] is False
    proc = _run("Global.mode=check_dataset", "CheckDataset.split.enable=True", "CheckDataset.split.train_percent=60",
                "CheckDataset.split.val_percent=30", f"Global.dataset_dir={tmp_path}", f"Global.output={out}")
    assert proc.returncode == 1 and "60" in json.loads((out / "check_dataset_result.json").read_text())["err_msg"]


def test_malformed_override_is_a_clear_error():
    proc = _run("Global.mode")
    assert proc.returncode == 2 and "malformed override 'Global.mode'" in proc.stderr
