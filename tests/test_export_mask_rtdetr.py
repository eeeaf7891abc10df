"""``instseg_core.export.export_model`` on Mask-RT-DETR-S with the oracle weights (input size 320).

The exported dir must reproduce the dygraph model through the predictor (detections matched as
sets: label, |dscore| <= 1e-3, box <= 1 px; masks |A xor B| <= max(0.01 |A u B|, 64)), declare
``batch_inference: true``, and a batch of two different-size images must equal running them one
at a time (each image's masks at its own original size, zero-padded to the largest).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from export_utils import export_to_tmp, read_inference_yml
from oracle_utils import instance_rows, match_with_masks, oracle_model, run_dygraph

ROOT = Path(__file__).resolve().parents[2]
ORACLES = ROOT / "shared" / "oracles"
FOLDER = ORACLES / "Mask-RT-DETR-S"
IMAGE = ROOT / "shared" / "data" / "coco_tiny_val2017" / "val2017" / "000000005001.jpg"

pytestmark = pytest.mark.skipif(
    not ((FOLDER / "state_dict.tsv").exists() and (ORACLES / "weights_rule.py").exists() and IMAGE.exists()),
    reason="shared/oracles/Mask-RT-DETR-S or the test photo not available")

INPUT_SIZE = 320
SCORE_TOL, BOX_TOL = 1e-3, 1.0


def _build():
    return oracle_model("Mask-RT-DETR-S")


def _dygraph(model, inputs):
    return run_dygraph(model, inputs)


def _match(exp_rows, exp_masks, got_rows, got_masks):
    return match_with_masks(exp_rows, exp_masks, got_rows, got_masks, score_tol=SCORE_TOL, box_tol=BOX_TOL)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_to_tmp(tmp_path_factory, _build(), "mask_rtdetr_s", input_size=INPUT_SIZE, draw_threshold=0.0)


@pytest.fixture(scope="module")
def predictor(exported):
    from instseg_core.inference.predictor import create_model

    return create_model(model_dir=exported[1])


@pytest.fixture(scope="module")
def images():
    import cv2

    img1 = cv2.imread(str(IMAGE))
    # a second image of another size (same orientation): a crop of the first one, mirrored
    img2 = np.ascontiguousarray(img1[40:400, 100:560][:, ::-1])
    assert img2.shape[:2] != img1.shape[:2]
    return img1, img2


def test_inference_dir_files_and_yml(exported):
    cfg = read_inference_yml(exported[1], "Mask-RT-DETR-S", "DETR")
    assert cfg["draw_threshold"] == 0.0 and cfg["batch_inference"] is True
    assert cfg["use_dynamic_shape"] is False and cfg["min_subgraph_size"] == 3
    assert [op["type"] for op in cfg["Preprocess"]] == ["Resize", "NormalizeImage", "Permute"]
    resize, norm = cfg["Preprocess"][0], cfg["Preprocess"][1]
    assert resize["target_size"] == [INPUT_SIZE, INPUT_SIZE] and resize["keep_ratio"] is False
    assert norm["norm_type"] == "none"


def test_graph_inputs_and_outputs(exported, predictor, images):
    import json
    import re

    from instseg_core.inference.preprocess import collate

    _, out = exported
    assert predictor.engine.input_names == ["im_shape", "image", "scale_factor"]
    # the declared input shapes, as the PIR program's data ops record them
    text = (out / "inference.json").read_text()
    found = re.findall(r'"1\.data","A":\[\{"AT":\{"#":"0\.a_str","D":"(\w+)"\},"N":"name"\},'
                       r'\{"AT":\{"#":"1\.a_intarray","D":(\[[-0-9,]*\])\}', text)
    assert {name: json.loads(shape) for name, shape in found} == {
        "im_shape": [-1, 2], "image": [-1, 3, INPUT_SIZE, INPUT_SIZE], "scale_factor": [-1, 2]}
    outputs = predictor.engine.run(collate(predictor.preprocess([images[0]])))
    bbox, bbox_num, mask = outputs
    h, w = images[0].shape[:2]
    assert bbox.dtype == np.float32 and bbox.shape == (100, 6)
    assert bbox_num.dtype == np.int32 and bbox_num.tolist() == [100]
    assert mask.dtype == np.uint8 and mask.shape == (100, h, w)


def test_predictor_matches_dygraph(exported, predictor, images):
    from instseg_core.inference.postprocess import box_instances
    from instseg_core.inference.preprocess import collate

    model, _ = exported
    img = images[0]
    samples = predictor.preprocess([img])
    inst = predictor.infer(samples, threshold=0.0)[0]
    ref = _dygraph(model, collate(samples))
    assert ref["mask"].shape[1:] == img.shape[:2]
    # the same thresholding / clipping / degenerate-box drop on the dygraph rows
    exp = box_instances(ref["bbox"], ref["mask"], img.shape[:2], 0.0)
    assert len(exp.boxes) >= 20, "too few detections with score > 0 to compare"
    assert len(inst.boxes) == len(exp.boxes)
    m = _match(instance_rows(exp), np.asarray(exp.masks), instance_rows(inst), np.asarray(inst.masks))
    print(f"{len(exp.boxes)} detections: {m}")
    assert m.unmatched == 0 and m.mask_failures == 0


def test_batch_of_two_equals_single(exported, predictor, images):
    from instseg_core.inference.postprocess import box_instances
    from instseg_core.inference.preprocess import collate

    model, _ = exported
    img1, img2 = images
    samples = predictor.preprocess([img1, img2])
    outputs = predictor.engine.run(collate(samples))
    bbox, bbox_num, mask = outputs
    hmax, wmax = max(img1.shape[0], img2.shape[0]), max(img1.shape[1], img2.shape[1])
    assert bbox_num.tolist() == [100, 100] and bbox.shape == (200, 6) and mask.shape == (200, hmax, wmax)
    # the smaller image's masks are zero outside its own size
    h2, w2 = img2.shape[:2]
    assert not mask[100:, h2:, :].any() and not mask[100:, :, w2:].any()
    assert mask[100:].any()
    # the dygraph model on the same batch gives the same layout
    ref = _dygraph(model, collate(samples))
    assert ref["bbox"].shape == (200, 6) and ref["mask"].shape == (200, hmax, wmax)
    singles = []
    for k, (s, img) in enumerate(zip(samples, images)):
        single = predictor.engine.run(collate([s]))
        singles.append(single)
        h, w = img.shape[:2]
        assert single[2].shape == (100, h, w)
        rows, masks = bbox[100 * k:100 * (k + 1)], mask[100 * k:100 * (k + 1)]
        m = _match(single[0], single[2], rows, masks[:, :h, :w])
        assert m.unmatched == 0 and m.mask_failures == 0, (k, m)
        m = _match(rows, masks, ref["bbox"][100 * k:100 * (k + 1)], ref["mask"][100 * k:100 * (k + 1)])
        assert m.unmatched == 0 and m.mask_failures == 0, (k, m)
    # and the predictor, which batches dirs that declare batch_inference, agrees with one at a time
    both = predictor.infer(samples, threshold=0.0)
    for s, single, got in zip(samples, singles, both):
        one = box_instances(single[0], single[2], s.orig_hw, 0.0)
        assert len(one.boxes) == len(got.boxes) > 0
        m = _match(instance_rows(one), np.asarray(one.masks), instance_rows(got), np.asarray(got.masks))
        assert m.unmatched == 0 and m.mask_failures == 0


def test_every_size_has_an_export_name():
    from instseg_core.export import _model_name_of
    from instseg_core.modeling.build import build_model

    for size in "SM":  # (L / X / H build the same way; skipped for time)
        assert _model_name_of(build_model(f"Mask-RT-DETR-{size}")) == f"Mask-RT-DETR-{size}"
