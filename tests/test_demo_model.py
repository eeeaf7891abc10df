"""The shipped demo model (``samples/model``): trained by this project from scratch on CPU.

It is ``instseg_core/configs/shapes_tiny.yaml`` trained on the synthetic shapes dataset
(``bench/train_synthetic.py --export-demo samples/model``). Here it runs through the real
predictor on a held-out set generated with a seed never used for training. The shipped model
(80 epochs, ~136 CPU-minutes on a shared 2-core VM, validation mask AP 0.550) must keep a held-out
mask and box AP >= 0.5 (the issue's target; measured here: mask 0.569, box 0.609): the proof that
the losses, the training engine, the export and the predictor fit together.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from instseg_core import create_model
from instseg_core.datasets.synthetic import CLASSES, make_dataset
from instseg_core.evaluation import evaluate_coco
from instseg_core.masks import encode_rle

DEMO = Path(__file__).resolve().parents[1] / "samples" / "model"


def test_demo_model_is_small_and_labelled():
    import yaml

    files = {f.name: f.stat().st_size for f in DEMO.iterdir()}
    assert {"inference.json", "inference.pdiparams", "inference.yml"} <= set(files)
    assert sum(files.values()) < 10e6
    yml = yaml.safe_load((DEMO / "inference.yml").read_text())
    assert yml["label_list"] == list(CLASSES)


def test_demo_model_reaches_mask_ap_on_held_out_shapes(tmp_path):
    import json

    data = make_dataset(tmp_path / "heldout", num_train=0, num_val=30, seed=20261126)
    gt = json.loads((data / "annotations" / "instance_val.json").read_text())
    model = create_model("PP-YOLOE_seg-S", model_dir=DEMO, threshold=0.0)
    results = []
    for im in gt["images"]:
        (inst,) = model.predict_arrays([cv2.imread(str(data / "images" / im["file_name"]))])
        for box, score, cls, rle in zip(inst.boxes, inst.scores, inst.class_ids, encode_rle(inst.masks)):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": im["id"], "category_id": int(cls) + 1, "score": float(score),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle})
    stats = evaluate_coco(gt, results)
    print(f"held-out mask AP {stats['segm']['AP']:.4f}, box AP {stats['bbox']['AP']:.4f}")
    assert stats["segm"]["AP"] >= 0.5, stats
    assert stats["bbox"]["AP"] >= 0.5, stats
