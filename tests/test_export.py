"""``instseg_core.export.export_model`` on PP-YOLOE_seg-S with the oracle weights.

The exported dir (input size 320) must reproduce the dygraph model through the predictor, the
RepVGG fusion must not change the outputs, and a batch of two different-size images must equal
running them one at a time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from export_utils import export_to_tmp, read_inference_yml
from oracle_utils import (detection_misses, instance_rows, match_rows, match_with_masks, oracle_dir, oracle_model,
                          run_dygraph, state_shapes, weights_rule)

ROOT = Path(__file__).resolve().parents[2]
MODEL = "PP-YOLOE_seg-S"
FOLDER = oracle_dir(MODEL)
IMAGE = ROOT / "shared" / "data" / "coco_tiny_val2017" / "val2017" / "000000005001.jpg"
IMAGE2 = ROOT / "shared" / "data" / "coco_tiny_val2017" / "val2017"

pytestmark = pytest.mark.skipif(not ((FOLDER / "state_dict.tsv").exists() and IMAGE.exists()),
                                reason="shared/oracles/PP-YOLOE_seg-S or the test photo not available")

INPUT_SIZE = 320
THRESHOLD = 0.02  # the oracle-rule weights give low scores; keep enough rows to compare
SCORE_TOL, BOX_TOL, MIN_IOU = 1e-3, 1.0, 0.99
MAX_THRESHOLD_FLIPS = 2  # rows per side that may flip at THRESHOLD between two kernel sets


def _build():
    return oracle_model(MODEL)


def _dygraph(model, inputs):
    return run_dygraph(model, inputs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # score_floor=None: the dygraph reference keeps every detection above 0.01 (the oracle-rule
    # weights score low), so the graph must too
    return export_to_tmp(tmp_path_factory, _build(), "ppyoloe_seg_s", input_size=INPUT_SIZE, score_floor=None,
                         draw_threshold=THRESHOLD)


def test_inference_dir_files_and_yml(exported):
    cfg = read_inference_yml(exported[1], "PP-YOLOE_seg-S", "PPYOLOE")
    assert cfg["draw_threshold"] == THRESHOLD and cfg["batch_inference"] is True
    assert cfg["use_dynamic_shape"] is False and cfg["min_subgraph_size"] == 3
    resize = [op for op in cfg["Preprocess"] if op["type"] == "Resize"][0]
    assert resize["target_size"] == [INPUT_SIZE, INPUT_SIZE]


def test_predictor_matches_dygraph(exported):
    import cv2

    from instseg_core.inference.predictor import create_model
    from instseg_core.inference.preprocess import collate

    model, out = exported
    pred = create_model(model_dir=out)
    img = cv2.imread(str(IMAGE))
    samples = pred.preprocess([img])
    inst = pred.infer(samples)[0]
    ref = _dygraph(model, collate(samples))
    keep = ref["bbox"][:, 1] > THRESHOLD
    exp_rows, exp_masks = ref["bbox"][keep], ref["mask"][keep]
    h, w = img.shape[:2]
    # the predictor clips boxes to the image: do the same to the dygraph rows
    exp_rows = exp_rows.copy()
    exp_rows[:, 2:6] = np.clip(exp_rows[:, 2:6], 0, [w, h, w, h])
    got_rows = instance_rows(inst)
    got_masks = np.asarray(inst.masks)
    assert len(exp_rows) >= 5, "too few detections above the threshold to compare"
    _assert_same_detections(exp_rows, got_rows)
    m = match_with_masks(exp_rows, exp_masks, got_rows, got_masks, score_tol=SCORE_TOL, box_tol=BOX_TOL)
    print(f"{len(got_rows)} detections: {m}")
    assert m.worst_iou >= MIN_IOU


def _assert_same_detections(exp_rows: np.ndarray, got_rows: np.ndarray, box_tol: float = BOX_TOL) -> None:
    """Rows matched as sets (label, |dscore| <= SCORE_TOL, box <= ``box_tol``); at most
    ``MAX_THRESHOLD_FLIPS`` per side unmatched, each within SCORE_TOL of THRESHOLD: the graph and
    dygraph run other kernels (oneDNN, MKL by CPU), so a row at the threshold may flip."""
    pairs = match_rows(exp_rows, got_rows, score_tol=SCORE_TOL, box_tol=box_tol)
    exp_miss, got_miss, off = detection_misses(exp_rows, got_rows, pairs, [THRESHOLD], SCORE_TOL)
    assert max(len(exp_miss), len(got_miss)) <= MAX_THRESHOLD_FLIPS and not off, (exp_miss, got_miss, off)


def test_fused_equals_unfused():
    """Each fused RepVGG block equals its training form within 1e-4 relative; the whole network
    stays within the oracle tolerances (float32 rounding accumulates over the layers)."""
    import copy

    import paddle

    from instseg_core.export import convert_to_deploy
    from instseg_core.modeling.layers import RepVggBlock

    model = _build()
    rs = np.random.RandomState(0)
    blocks = [l for l in model.sublayers() if isinstance(l, RepVggBlock)]
    assert blocks
    for block in blocks:
        x = paddle.to_tensor(rs.normal(0, 1, (1, block.ch_in, 12, 12)).astype("float32"))
        fused_block = copy.deepcopy(block)
        fused_block.convert_to_deploy()
        assert hasattr(fused_block, "conv") and not hasattr(fused_block, "conv1")
        with paddle.no_grad():
            y0, y1 = block(x).numpy(), fused_block(x).numpy()
        rel = float(np.abs(y0 - y1).max()) / max(float(np.abs(y0).max()), 1e-12)
        assert rel <= 1e-4, rel

    fused = convert_to_deploy(copy.deepcopy(model))
    assert not any(hasattr(l, "conv1") for l in fused.sublayers() if isinstance(l, RepVggBlock))
    image = paddle.to_tensor(rs.uniform(0, 1, (1, 3, 160, 160)).astype("float32"))
    with paddle.no_grad():
        a = [t.numpy() for t in model.head_outputs(image)]
        b = [t.numpy() for t in fused.head_outputs(image)]
    assert float(np.abs(a[0] - b[0]).max()) <= 1e-3  # class probabilities
    for x, y in zip(a[1:4], b[1:4]):  # box distances (stride units), mask coefficients, prototypes
        assert float(np.abs(x - y).max()) <= 5e-3 * float(x.std())


def test_batch_of_two_equals_single(exported):
    import cv2

    from instseg_core.inference.predictor import create_model
    from instseg_core.inference.preprocess import collate

    _, out = exported
    pred = create_model(model_dir=out)
    img1 = cv2.imread(str(IMAGE))
    # a second image of another size: a crop of the first one, mirrored
    img2 = np.ascontiguousarray(img1[40:400, 100:560][:, ::-1])
    assert img2.shape[:2] != img1.shape[:2]
    samples = pred.preprocess([img1, img2])
    outputs = pred.engine.run(collate(samples))
    bbox, bbox_num, mask = outputs
    assert bbox_num.shape == (2,) and int(bbox_num.sum()) == len(bbox)
    assert mask.shape[1:] == (max(img1.shape[0], img2.shape[0]), max(img1.shape[1], img2.shape[1]))
    singles = [pred._infer_one(s, 0.0) for s in samples]  # every row the graph gives
    batched = pred._postprocess(outputs, samples, 0.0)
    n0 = int(bbox_num[0])
    pad = mask[n0:, img2.shape[0]:, :]
    assert not pad.any() and not mask[n0:, :, img2.shape[1]:].any()
    for one, both in zip(singles, batched):
        assert len(one.boxes) == len(both.boxes) and len(one.boxes) > 0
        np.testing.assert_allclose(one.boxes, both.boxes, atol=1e-3)
        np.testing.assert_allclose(one.scores, both.scores, atol=1e-5)
        np.testing.assert_array_equal(one.class_ids, both.class_ids)
        for a, b in zip(np.asarray(one.masks), np.asarray(both.masks)):
            union = np.count_nonzero(a | b)
            assert union == 0 or np.count_nonzero(a & b) / union >= MIN_IOU


def test_weights_path_and_bad_input_size(tmp_path):
    import paddle

    from instseg_core.export import export_model

    with pytest.raises(ValueError):
        export_model("PP-YOLOE_seg-S", None, tmp_path / "x", input_size=100)
    # a .pdparams path is loaded with paddle.load (smoke: the file round-trips)
    path = tmp_path / "w.pdparams"
    paddle.save({k: paddle.to_tensor(v) for k, v in weights_rule().fill(state_shapes(MODEL)).items()}, str(path))
    out = export_model("PP-YOLOE_seg-S", path, tmp_path / "y", input_size=64)
    assert (out / "inference.json").is_file() and (out / "inference.pdiparams").is_file()


def test_graph_runs_under_onednn_and_with_no_detection(exported, tmp_path):
    """No *_interp op in the graph (Paddle 3.3's PIR cannot run one under oneDNN, PaddleX's CPU
    default for this model); and with nothing detected the graph gives one class -1 row per batch
    (never a 0-size tensor, which oneDNN kernels cannot run), which the predictor drops."""
    import copy

    import cv2

    from instseg_core.export import export_model
    from instseg_core.inference.predictor import create_model
    from instseg_core.inference.preprocess import collate

    model, out = exported
    assert "_interp\"" not in (out / "inference.json").read_text()
    img = cv2.imread(str(IMAGE))
    img2 = np.ascontiguousarray(img[40:400, 100:560])
    ref = None
    for onednn in (True, False):
        pred = create_model(model_dir=out, enable_onednn=onednn)
        got = pred.infer(pred.preprocess([img]), threshold=THRESHOLD)[0]
        assert pred.engine.onednn == onednn  # no fallback
        if ref is None:
            ref = got
        else:  # oneDNN and plain kernels agree
            assert len(got.boxes) > 0 and len(ref.boxes) > 0
            _assert_same_detections(instance_rows(ref), instance_rows(got), box_tol=1e-2)
    silent = copy.deepcopy(model)
    silent.yolo_head.score_threshold = 2.0  # sigmoid scores never pass: NMS keeps nothing
    out2 = export_model(silent, None, tmp_path / "silent", input_size=INPUT_SIZE)
    for onednn in (True, False):
        pred = create_model(model_dir=out2, enable_onednn=onednn)
        samples = pred.preprocess([img, img2])
        bbox, bbox_num, mask = pred.engine.run(collate(samples))
        assert pred.engine.onednn == onednn
        np.testing.assert_array_equal(bbox, [[-1, 0, 0, 0, 0, 0]])
        assert bbox_num.tolist() == [1, 0] and mask.shape[0] == 1 and not mask.any()
        assert [len(r.boxes) for r in pred.infer(samples, threshold=0.0)] == [0, 0]
        assert len(pred.infer(pred.preprocess([img2]), threshold=0.0)[0].boxes) == 0


def test_weights_that_do_not_fit_are_an_error_unless_not_strict(tmp_path):
    """A .pdparams with one unrelated key used to give a full inference dir of random weights
    and a warning; now it is an error naming missing keys (strict=False still exports)."""
    import pickle

    import paddle

    from instseg_core.export import export_model
    from instseg_core.modeling.weights import WeightsError

    path = tmp_path / "unrelated.pdparams"
    paddle.save({"foo.weight": paddle.zeros([3])}, str(path))
    with pytest.raises(WeightsError, match=r"keys missing \(e\.g\. backbone\..*foo\.weight"):
        export_model("PP-YOLOE_seg-S", path, tmp_path / "x", input_size=64)
    assert not (tmp_path / "x" / "inference.json").exists()
    with pytest.warns(UserWarning, match="exporting anyway"):
        out = export_model("PP-YOLOE_seg-S", path, tmp_path / "y", input_size=64, strict=False)
    assert (out / "inference.json").is_file()

    # a file whose weights have another shape (another class count) is named too
    state = weights_rule().fill(state_shapes(MODEL))
    state["yolo_head.pred_cls.0.weight"] = np.zeros((3, 384, 3, 3), np.float32)
    with pytest.raises(WeightsError, match="another shape .*pred_cls.0.weight"):
        export_model("PP-YOLOE_seg-S", state, tmp_path / "z", input_size=64)

    # the path is read without unpickling code: a pickle with a payload is refused, not run
    class Payload:
        def __reduce__(self):
            return (eval, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(WeightsError, match="forbidden global"):
        export_model("PP-YOLOE_seg-S", evil, tmp_path / "e", input_size=64)
    assert not (tmp_path / "pwned").exists()


def test_cli_export_with_wrong_weights_is_one_line(tmp_path, caplog):
    import json
    import logging

    import paddle

    from instseg_core.cli import main

    path = tmp_path / "unrelated.pdparams"
    paddle.save({"foo.weight": paddle.zeros([3])}, str(path))
    with caplog.at_level(logging.ERROR, logger="instseg"):
        rc = main(["run", "-c", "shapes_tiny", "-o", "Global.mode=export", "-o", f"Export.weight_path={path}",
                   "-o", f"Global.output={tmp_path / 'out'}"])
    assert rc == 1 and "do not fit the network" in caplog.text and "Export.strict=False" in caplog.text
    record = json.loads((tmp_path / "out" / "export_result.json").read_text())
    assert record["done_flag"] is False and "WeightsError" in record["err_type"]
    assert not (tmp_path / "out" / "inference.json").exists()
