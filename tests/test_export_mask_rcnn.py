"""``instseg_core.export.export_model`` on MaskRCNN-ResNet50-FPN with the oracle weights.

The exported dir (dynamic input height/width, one image per call) must carry the R-CNN
preprocessing (keep-ratio resize, normalise, permute, pad to a multiple of 32) in
``inference.yml``, and the predictor must reproduce the dygraph model on photos of different
sizes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from export_utils import export_to_tmp, read_inference_yml
from oracle_utils import instance_rows, match_with_masks, oracle_available, oracle_model, run_dygraph

ROOT = Path(__file__).resolve().parents[2]
MODEL = "MaskRCNN-ResNet50-FPN"
PHOTOS = ROOT / "shared" / "data" / "coco_tiny_val2017" / "val2017"
IMAGES = (PHOTOS / "000000005001.jpg", PHOTOS / "000000020992.jpg")  # 480x640 and 333x500

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (oracle_available(MODEL, ("state_dict.tsv",)) and all(p.exists() for p in IMAGES)),
                       reason=f"shared/oracles/{MODEL} or the test photos not available"),
]

INPUT_SIZE = 320    # inference.yml Resize target [320, 533] (keeps the official 800:1333 shape)
THRESHOLD = 0.05    # the NMS score threshold: keep every detection
SCORE_TOL, BOX_TOL, MIN_IOU = 1e-3, 1.0, 0.99


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_to_tmp(tmp_path_factory, oracle_model(MODEL), "mask_rcnn_r50_fpn", input_size=INPUT_SIZE,
                         draw_threshold=THRESHOLD)


def test_inference_dir_files_and_yml(exported):
    cfg = read_inference_yml(exported[1], MODEL, "RCNN")
    assert cfg["min_subgraph_size"] == 40 and cfg["draw_threshold"] == THRESHOLD
    assert cfg["batch_inference"] is False  # one image per call: the predictor never tries a batch
    ops = {op["type"]: op for op in cfg["Preprocess"]}
    assert [op["type"] for op in cfg["Preprocess"]] == ["Resize", "NormalizeImage", "Permute", "PadStride"]
    assert ops["Resize"]["keep_ratio"] is True and ops["Resize"]["interp"] == 2
    assert ops["Resize"]["target_size"] == [INPUT_SIZE, int(INPUT_SIZE * 5 / 3)]
    assert ops["PadStride"]["stride"] == 32
    assert ops["NormalizeImage"]["mean"] == [0.485, 0.456, 0.406] and ops["NormalizeImage"]["is_scale"] is True


def test_predictor_matches_dygraph_at_two_input_sizes(exported):
    """Raw graph outputs equal the dygraph ones on two photos of different sizes (the second has
    no detection with these weights: both give the reference's placeholder row), and the
    predictor's instances match the dygraph detections."""
    import cv2

    from instseg_core.inference.predictor import create_model
    from instseg_core.inference.preprocess import collate

    model, out = exported
    pred = create_model(model_dir=out)
    input_shapes, compared = set(), 0
    for path in IMAGES:
        img = cv2.imread(str(path))
        samples = pred.preprocess([img])
        batch = collate(samples)
        input_shapes.add(batch["image"].shape)
        assert batch["image"].shape[2] % 32 == 0 and batch["image"].shape[3] % 32 == 0
        ref = run_dygraph(model, batch)
        assert ref["mask"].shape[1:] == img.shape[:2]

        # the graph itself: outputs in sorted-key order bbox, bbox_num, mask
        g_bbox, g_num, g_mask = pred.engine.run(batch)
        assert g_num.tolist() == ref["bbox_num"].tolist() and g_mask.dtype == np.uint8
        assert g_mask.shape == ref["mask"].shape
        m = match_with_masks(ref["bbox"], ref["mask"], g_bbox, g_mask, score_tol=SCORE_TOL, box_tol=BOX_TOL)
        print(f"{path.name} input {batch['image'].shape}: graph {len(g_bbox)} rows, {m}")
        assert m.unmatched == 0 and m.worst_iou >= MIN_IOU

        # the predictor's instances (rows at or above the threshold; the placeholder has score 0)
        inst = pred.infer(samples)[0]
        keep = ref["bbox"][:, 1] >= THRESHOLD
        exp_rows, exp_masks = ref["bbox"][keep], ref["mask"][keep]
        got_rows = instance_rows(inst)
        assert len(got_rows) == len(exp_rows), (path.name, len(got_rows), len(exp_rows))
        m = match_with_masks(exp_rows, exp_masks, got_rows, np.asarray(inst.masks), score_tol=SCORE_TOL,
                             box_tol=BOX_TOL)
        assert m.unmatched == 0 and m.worst_iou >= MIN_IOU
        compared += len(exp_rows)
    assert len(input_shapes) == 2  # the same graph ran two different input sizes
    assert compared >= 5, "too few detections to compare"
