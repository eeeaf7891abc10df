"""``instseg run`` train / evaluate / export end to end, with PaddleX's output files.

1. A tiny PP-YOLOE_seg variant trained for 2 epochs on the synthetic dataset through the CLI, then
   resumed for a 3rd epoch, evaluated and exported; the export runs in the predictor.
2. Fine-tuning PP-YOLOE_seg-S from the oracle-filled weights of the real config (a .pdparams
   file, 80 classes -> the dataset's classes) on real COCO images writes every output file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from instseg_core.config import apply_overrides, load_config
from instseg_core.modes import run_config

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = REPO.parent / "shared" / "data" / "coco_tiny_val2017"
TINY_ARCH = "{'width_mult': 0.125, 'num_protos': 16}"
CHECKPOINT_FILES = ("pdparams", "pdopt", "pdstates", "pdema")


def _cfg(model: str, overrides: list[str]) -> dict:
    return apply_overrides(load_config(REPO / "instseg_core" / "configs" / f"{model}.yaml"), overrides)


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory) -> Path:
    from instseg_core.datasets.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=3, size=96, seed=1)


def _tiny_overrides(dataset: Path, out: Path, epochs: int) -> list[str]:
    return [f"Global.dataset_dir={dataset}", f"Global.output={out}", "Global.device=cpu",
            "Train.num_classes=4", f"Train.epochs_iters={epochs}", "Train.batch_size=4",
            "Train.learning_rate=0.01", "Train.warmup_steps=2", "Train.input_size=96",
            "Train.log_interval=1", "Train.pretrain_weight_path=None", f"Train.arch={TINY_ARCH}"]


@pytest.mark.slow
def test_train_resume_evaluate_export_through_the_cli(shapes_dataset, tmp_path):
    out = tmp_path / "out"
    base = [sys.executable, "-m", "instseg_core", "run", "-c", "PP-YOLOE_seg-S"]
    train = base + ["-o", "Global.mode=train"] + [a for o in _tiny_overrides(shapes_dataset, out, 2)
                                                   for a in ("-o", o)]
    r = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.yaml", "train.log", "train_result.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "train_result.json").read_text())
    assert record["done_flag"] is True and record["model_name"] == "PP-YOLOE_seg-S"
    assert set(record["models"]) == {"last_1", "last_2", "last_3", "last_4", "last_5", "best"}
    assert record["models"]["last_1"]["pdparams"] == "1/1.pdparams"
    assert record["models"]["last_2"]["pdparams"] == "0/0.pdparams" and record["models"]["last_3"] == {}
    for ext in CHECKPOINT_FILES:
        assert (out / "1" / f"1.{ext}").is_file() and (out / "best_model" / f"best_model.{ext}").is_file()
    best = record["models"]["best"]
    assert (out / best["inference_config"]).is_file() and (out / best["pdiparams"]).is_file()
    assert "mask AP" in (out / "train.log").read_text()
    # the last line says where the result is
    assert f"weights {out / 'best_model' / 'best_model.pdparams'}" in r.stderr, r.stderr[-2000:]

    # resume from the last epoch: one more epoch, the epoch counter continues (AMP asked on CPU:
    # a warning, not a failure)
    resumed = train + ["-o", "Train.epochs_iters=3", "-o", f"Train.resume_path={out / '1'}", "-o", "Train.amp=O1"]
    r = subprocess.run(resumed, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "train_result.json").read_text())
    assert record["models"]["last_1"]["pdparams"] == "2/2.pdparams"
    assert record["models"]["last_2"]["pdparams"] == "1/1.pdparams"
    log = (out / "train.log").read_text()
    assert "Train.amp=O1 ignored on device cpu" in log
    assert "resumed from" in log and "epoch [3/3]" in log and "epoch [1/3]" not in log.split("resumed from")[-1]

    ev_out = tmp_path / "eval"
    assert run_config(_cfg("PP-YOLOE_seg-S", _tiny_overrides(shapes_dataset, ev_out, 1) + [
        "Global.mode=evaluate", f"Evaluate.weight_path={out / 'best_model' / 'best_model.pdparams'}"])) == 0
    ev = json.loads((ev_out / "evaluate_result.json").read_text())
    assert ev["done_flag"] is True and 0.0 <= ev["metrics"]["AP"] <= 1.0
    assert set(ev["metrics"]["segm"]) >= {"AP", "AP50", "AR100"}

    ex_out = tmp_path / "export"
    assert run_config(_cfg("PP-YOLOE_seg-S", _tiny_overrides(shapes_dataset, ex_out, 1) + [
        "Global.mode=export", f"Export.weight_path={out / 'best_model' / 'best_model.pdparams'}"])) == 0
    import yaml

    yml = yaml.safe_load((ex_out / "inference.yml").read_text())
    assert yml["label_list"] == ["circle", "square", "triangle", "star"]
    from instseg_core import create_model

    model = create_model("PP-YOLOE_seg-S", model_dir=ex_out, threshold=0.0)
    image = next((shapes_dataset / "images").glob("val_*.jpg"))
    (res,) = list(model.predict(str(image)))
    assert res.json["res"]["input_path"].endswith(image.name)


def test_evaluate_reports_a_class_count_mismatch(shapes_dataset, tmp_path):
    from instseg_core.modeling import build_model
    from instseg_core.training.checkpoint import save_checkpoint

    net = build_model("PP-YOLOE_seg-S", num_classes=3, width_mult=0.125, num_protos=16)
    save_checkpoint(tmp_path / "w", "w", weights=net.state_dict())
    out = tmp_path / "out"
    code = run_config(_cfg("PP-YOLOE_seg-S", _tiny_overrides(shapes_dataset, out, 1) + [
        "Global.mode=evaluate", f"Evaluate.weight_path={tmp_path / 'w' / 'w.pdparams'}"]))
    assert code == 1
    err = json.loads((out / "evaluate_result.json").read_text())
    assert err["done_flag"] is False and "3 classes" in err["err_msg"] and "4 categories" in err["err_msg"]


def test_train_rejects_a_wrong_num_classes(shapes_dataset, tmp_path):
    out = tmp_path / "out"
    overrides = _tiny_overrides(shapes_dataset, out, 1) + ["Global.mode=train", "Train.num_classes=2"]
    assert run_config(_cfg("PP-YOLOE_seg-S", overrides)) == 1
    err = json.loads((out / "train_result.json").read_text())
    assert "Train.num_classes=4" in err["err_msg"]


def _coco_tiny_dataset(root: Path) -> Path:
    """PaddleX layout from the 8-image mini annotation file: 6 train / 2 val images."""
    ann = COCO_TINY / "annotations" / "instances_val2017_mini8.json"
    if not ann.exists():
        pytest.skip("shared/data/coco_tiny_val2017 not available")
    coco = json.loads(ann.read_text())
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = sorted(coco["images"], key=lambda im: im["id"])
    for im in images:
        shutil.copy(COCO_TINY / "val2017" / im["file_name"], root / "images" / im["file_name"])
    for split, subset in (("train", images[:6]), ("val", images[6:])):
        ids = {im["id"] for im in subset}
        part = dict(coco, images=subset, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
        (root / "annotations" / f"instance_{split}.json").write_text(json.dumps(part))
    return root


@pytest.mark.slow
def test_fine_tune_from_oracle_weights_writes_every_output(tmp_path):
    from oracle_utils import require_oracle, state_shapes, weights_rule

    require_oracle("PP-YOLOE_seg-S", ("state_dict.tsv",))
    import paddle

    weights = weights_rule().fill(state_shapes("PP-YOLOE_seg-S"))
    pretrained = tmp_path / "PP-YOLOE_seg-S_pretrained.pdparams"
    paddle.save({k: np.asarray(v) for k, v in weights.items()}, str(pretrained))
    dataset = _coco_tiny_dataset(tmp_path / "coco")
    out = tmp_path / "out"
    cfg = _cfg("PP-YOLOE_seg-S", [
        "Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={out}", "Global.device=cpu",
        "Train.num_classes=80", "Train.epochs_iters=1", "Train.batch_size=2", "Train.input_size=320",
        "Train.log_interval=1", f"Train.pretrain_weight_path={pretrained}"])
    assert run_config(cfg) == 0, (out / "train_result.json").read_text() if (out / "train_result.json").exists() else ""
    log = (out / "train.log").read_text()
    # every official key loads (proj_conv, a fixed DFL constant, may be absent from a file)
    line = next(ln for ln in log.splitlines() if "pretrained weights" in ln)
    assert "0 skipped" in line and "0 unexpected" in line and int(line.split(": ")[-1].split()[0]) >= 472
    record = json.loads((out / "train_result.json").read_text())
    assert record["done_flag"] is True
    for ext in CHECKPOINT_FILES:
        assert (out / "0" / f"0.{ext}").is_file()
        assert (out / "best_model" / f"best_model.{ext}").is_file()
    info = json.loads((out / "best_model" / "best_model.info.json").read_text())
    assert info["epoch"] == 0 and info["metric"] == record["models"]["best"]["score"]
    for f in ("inference.json", "inference.pdiparams", "inference.yml"):
        assert (out / "best_model" / "inference" / f).is_file()
    # the fine-tuned weights moved away from the oracle fill
    tuned = paddle.load(str(out / "0" / "0.pdema"))
    key = "yolo_head.pred_ins.0.weight"
    assert not np.allclose(np.asarray(tuned[key]), weights[key])
