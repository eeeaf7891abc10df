"""``Global.mode=train`` on the keep-ratio families (Mask R-CNN, SOLOv2) end to end, in small.

A few images of the synthetic shapes dataset, one epoch from random weights: the run must write
PaddleX's outputs, evaluate through the exported predictor's keep-ratio preprocessing, and export a
``best_model/inference`` dir whose ``inference.yml`` has the trained short side and which the
predictor runs. (That the losses learn is tested per family in test_training_mask_rcnn.py and
test_training_solov2.py.)
"""
from __future__ import annotations

import json

import pytest
import yaml

from instseg_core.config import apply_overrides, load_config
from instseg_core.datasets.synthetic import CLASSES, make_dataset
from instseg_core.modes import run_config

SHORT_SIDE = 128


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("shapes"), num_train=2, num_val=1, size=128, seed=1)


# SOLOv2's official heads (512 wide, fixed 40..12 grids) take ~50 s per step here: a slim variant
ARCH = {"MaskRCNN-ResNet50-FPN": {},
        "SOLOv2": {"seg_feat_channels": 64, "stacked_convs": 2, "kernel_out_channels": 64, "mask_mid_channels": 32}}


@pytest.mark.parametrize("model", sorted(ARCH))
def test_train_evaluates_exports_and_predicts(model, shapes, tmp_path):
    from instseg_core.inference.predictor import create_model

    out = tmp_path / "out"
    cfg = apply_overrides(load_config(model), [
        "Global.mode=train", f"Global.dataset_dir={shapes}", f"Global.output={out}", "Global.device=cpu",
        "Train.num_classes=4", "Train.epochs_iters=1", "Train.batch_size=2", f"Train.input_size={SHORT_SIDE}",
        "Train.pretrain_weight_path=None", "Train.warmup_steps=1", "Train.log_interval=1",
        f"Train.arch={ARCH[model]}"])
    assert run_config(cfg) == 0, (out / "train_result.json").read_text()
    result = json.loads((out / "train_result.json").read_text())
    assert result["done_flag"] is True and result["model_name"] == model
    best = result["models"]["best"]
    for key in ("pdparams", "pdopt", "pdstates", "inference_config", "pdmodel", "pdiparams"):
        assert (out / best[key]).is_file(), key
    assert "pdema" not in best  # these recipes train without EMA
    log = (out / "train.log").read_text()
    assert "epoch [1/1] step [1/1]" in log and "mask AP" in log

    infer = out / "best_model" / "inference"
    yml = yaml.safe_load((infer / "inference.yml").read_text())
    resize = next(op for op in yml["Preprocess"] if op["type"] == "Resize")
    assert resize["keep_ratio"] is True and resize["target_size"] == [SHORT_SIDE, int(SHORT_SIDE * 5 / 3)]
    assert yml["label_list"] == list(CLASSES)
    val = json.loads((shapes / "annotations" / "instance_val.json").read_text())
    image = shapes / "images" / val["images"][0]["file_name"]
    (res,) = list(create_model(model_dir=infer).predict(str(image), threshold=0.0))
    assert res.json["res"]["input_path"] == str(image) and len(res["masks"]) == len(res["boxes"])
