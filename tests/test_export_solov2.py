"""``instseg_core.export.export_model`` on SOLOv2 with the oracle weights.

The exported graph takes any input size (``image`` [-1, 3, -1, -1]); its ``inference.yml`` has the
official SOLOv2 preprocessing (normalise *before* a keep-ratio bilinear resize, pad to 32), with
the Resize target [800, 1333] by default or ``[s, 5s/3]`` for ``input_size=s`` (256 here, to keep
the test fast). Through the project's predictor, the exported dir must reproduce the dygraph
model on two images of different sizes: same rows (label, |dscore| <= 1e-3, masks
|A xor B| <= max(0.01 |A u B|, 64)), padding row included.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from export_utils import export_to_tmp, read_inference_yml
from oracle_utils import match_with_masks, oracle_available, oracle_model, run_dygraph

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "shared" / "data" / "coco_tiny_val2017" / "val2017" / "000000005001.jpg"

pytestmark = pytest.mark.skipif(not (oracle_available("SOLOv2") and IMAGE.exists()),
                                reason="shared/oracles/SOLOv2 or the test photo not available")

INPUT_SIZE = 256
SCORE_TOL = 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_to_tmp(tmp_path_factory, oracle_model("SOLOv2"), "solov2", input_size=INPUT_SIZE,
                         draw_threshold=0.0)


def _preprocess_ops(cfg):
    return [op["type"] for op in cfg["Preprocess"]]


def test_inference_dir_files_and_yml(exported):
    _, out = exported
    cfg = read_inference_yml(out, "SOLOv2", "SOLOv2")
    assert cfg["min_subgraph_size"] == 60 and cfg["draw_threshold"] == 0.0
    assert cfg["batch_inference"] is False  # the graph reads image 0 only; PaddleX runs it one at a time
    # normalise before resizing, bilinear keep-ratio resize, pad to 32
    assert _preprocess_ops(cfg) == ["NormalizeImage", "Resize", "Permute", "PadStride"]
    norm, resize, _, pad = cfg["Preprocess"]
    assert norm["is_scale"] is True and norm["mean"] == [0.485, 0.456, 0.406] and norm["std"] == [0.229, 0.224, 0.225]
    assert resize == {"type": "Resize", "target_size": [INPUT_SIZE, int(INPUT_SIZE * 5 / 3)], "keep_ratio": True,
                      "interp": 1}
    assert pad["stride"] == 32
    # the graph takes any image size
    found = re.findall(r'"1\.data","A":\[\{"AT":\{"#":"0\.a_str","D":"(\w+)"\},"N":"name"\},'
                       r'\{"AT":\{"#":"1\.a_intarray","D":(\[[-0-9,]*\])\}', (out / "inference.json").read_text())
    assert {name: json.loads(shape) for name, shape in found} == {
        "im_shape": [-1, 2], "image": [-1, 3, -1, -1], "scale_factor": [-1, 2]}


def test_default_yml_has_the_official_resize(tmp_path):
    """Without ``input_size`` the Resize target is the official [800, 1333] (a small random
    network keeps the export quick; the graph does not depend on it)."""
    import yaml

    from instseg_core.export import export_model
    from instseg_core.modeling.solov2 import solov2

    out = export_model(solov2(num_classes=2), None, tmp_path / "infer", labels=["a", "b"])
    cfg = yaml.safe_load((out / "inference.yml").read_text())
    resize = [op for op in cfg["Preprocess"] if op["type"] == "Resize"][0]
    assert resize["target_size"] == [800, 1333] and resize["keep_ratio"] is True and resize["interp"] == 1
    assert cfg["label_list"] == ["a", "b"]


def _to_image_size(segm, h, w):
    """Masks cropped / zero-padded to (h, w) at the top-left (the same pixel grid)."""
    out = np.zeros((len(segm), h, w), dtype=segm.dtype)
    mh, mw = min(segm.shape[1], h), min(segm.shape[2], w)
    out[:, :mh, :mw] = segm[:, :mh, :mw]
    return out


def test_predictor_matches_dygraph(exported):
    import cv2

    from instseg_core.inference.predictor import create_model
    from instseg_core.inference.preprocess import collate

    model, out = exported
    pred = create_model(model_dir=out)
    img1 = cv2.imread(str(IMAGE))
    img2 = np.ascontiguousarray(img1[:, 100:420][:, ::-1])  # portrait: another padded input size
    for img in (img1, img2):
        samples = pred.preprocess([img])
        inputs = collate(samples)
        h, w = img.shape[:2]
        assert inputs["image"].shape[2] % 32 == 0 and inputs["image"].shape[3] % 32 == 0
        inst = pred.infer(samples, threshold=0.0)[0]
        ref = run_dygraph(model, inputs)
        n = int(ref["bbox_num"][0])
        assert ref["segm"].shape[0] == n > 1
        # the output size follows the reference, from the y scale for both axes: here within a
        # pixel of the image's (480 x 640 -> 256 x 341 -> 480 x 639); the predictor pads it
        assert abs(ref["segm"].shape[1] - h) <= 1 and abs(ref["segm"].shape[2] - w) <= 1
        ref["segm"] = _to_image_size(ref["segm"], h, w)
        assert len(inst.scores) == n and np.asarray(inst.masks).shape == (n, h, w)
        # rows of [label, score] (SOLOv2 has no boxes)
        m = match_with_masks(np.stack([ref["cate_label"], ref["cate_score"]], 1), ref["segm"],
                             np.stack([inst.class_ids, inst.scores], 1), np.asarray(inst.masks), score_tol=SCORE_TOL)
        print(f"{img.shape[:2]} -> input {inputs['image'].shape[2:]}: {n} rows, {m}")
        assert m.unmatched == 0 and m.mask_failures == 0
        # the raw graph outputs, in the reference's sorted-key order
        bbox_num, labels, scores, segm = pred.engine.run(inputs)
        assert labels.dtype == np.int64 and scores.dtype == np.float32 and segm.dtype == np.uint8
        assert int(np.asarray(bbox_num).reshape(-1)[0]) == n
        np.testing.assert_array_equal(labels, ref["cate_label"])
        np.testing.assert_allclose(scores, ref["cate_score"], atol=1e-5)
