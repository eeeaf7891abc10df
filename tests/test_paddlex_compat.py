"""Same model dirs, same images: PaddleX 3.7.2 (its own venv) and instseg give the same results.

The only expected difference is PaddleX's mask/box misalignment after a dropped degenerate box
(every tiny model has one such box: slot 1, a high-score box right of the image). The test checks
that the difference is exactly that shift, i.e. that PaddleX pairs the box after the dropped one
with the dropped box's mask, and that instseg keeps each mask with its own box.
"""

import json

import numpy as np
import pytest

from conftest import run_paddlex
from instseg_core.inference.predictor import create_model

pytestmark = pytest.mark.paddlex

MODELS = ["MaskRCNN-ResNet50-FPN", "Cascade-MaskRCNN-ResNet50-FPN", "Mask-RT-DETR-S", "Mask-RT-DETR-L",
          "PP-YOLOE_seg-S", "SOLOv2"]
THRESHOLDS = [None, 0.3]
# (model, threshold, batch_size): every model at batch 1 and two thresholds, plus batched runs
CASES = [(n, t, 1) for n in MODELS for t in THRESHOLDS] + [
    ("Mask-RT-DETR-L", None, 3), ("PP-YOLOE_seg-S", None, 2), ("Mask-RT-DETR-S", 0.3, 2)]
# (PaddleX cannot batch the keep-ratio models, MaskRCNN, Cascade and SOLOv2, over images of different sizes)


@pytest.fixture(scope="module")
def paddlex_results(paddlex_python, tiny_model_dirs, test_images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paddlex")
    requests, where = [], {}
    for name, thr, bs in CASES:
        out = tmp / f"{name}_{thr}_{bs}"
        out.mkdir()
        requests.append({"model_name": name, "model_dir": str(tiny_model_dirs(name)), "inputs": test_images,
                         "threshold": thr, "batch_size": bs, "out_dir": str(out), "cpu_threads": 2,
                         "run_mode": "paddle"})
        where[(name, thr, bs)] = out
    run_paddlex(paddlex_python, requests, tmp)
    return {k: (json.loads((v / "results.json").read_text()), np.load(v / "masks.npz")) for k, v in where.items()}


def _crop(mask: np.ndarray, coord) -> np.ndarray:
    x1, y1, x2, y2 = (int(round(c)) for c in coord)
    return mask[y1:y2, x1:x2]


@pytest.mark.parametrize("name, thr, bs", CASES)
def test_same_results_as_paddlex(name, thr, bs, paddlex_results, tiny_model_dirs, test_images):
    pdx, pdx_masks = paddlex_results[(name, thr, bs)]
    model = create_model(name, model_dir=tiny_model_dirs(name), device="cpu", cpu_threads=2, enable_onednn=False)
    ours = list(model.predict(test_images, batch_size=bs, threshold=thr))
    assert len(ours) == len(pdx) == len(test_images)
    shifted = 0
    for i, (res, ref) in enumerate(zip(ours, pdx)):
        assert res["input_path"] == ref["input_path"]
        assert len(res["boxes"]) == len(ref["boxes"]) > 0
        for b, rb in zip(res["boxes"], ref["boxes"]):
            keys = set(rb) - {"coordinate_is_int"}
            assert set(b) == keys
            assert b["label"] == rb["label"] and b.get("cls_id", b.get("class_id")) == rb.get("cls_id", rb.get("class_id"))
            assert b["score"] == pytest.approx(rb["score"], abs=1e-6)
            if "coordinate" in rb:
                np.testing.assert_allclose(b["coordinate"], rb["coordinate"], atol=1e-3)
                assert [isinstance(c, int) for c in b["coordinate"]] == rb["coordinate_is_int"]
        full = res.instances.dense_masks()
        ref_masks = [pdx_masks[f"img{i}_mask{j}"].astype(bool) for j in range(ref["num_masks"])]
        ours_cropped = [m.astype(bool) for m in res["masks"]]
        if name == "SOLOv2":  # no box path, no clipping: identical full-image masks
            assert all(np.array_equal(a, b) for a, b in zip(ours_cropped, ref_masks))
            continue
        first_diff = next((j for j, (a, b) in enumerate(zip(ours_cropped, ref_masks)) if not np.array_equal(a, b)),
                          None)
        if first_diff is None:
            continue
        shifted += 1
        d = first_diff  # PaddleX: box d was paired with the dropped box's mask, box j>d with our mask j-1
        for j in range(d + 1, len(res["boxes"])):
            np.testing.assert_array_equal(ref_masks[j], _crop(full[j - 1], res["boxes"][j]["coordinate"]))
        # ours: each mask lies inside its own box (the tiny models' masks are confined to their boxes)
        for j, b in enumerate(res["boxes"]):
            ys, xs = np.nonzero(full[j])
            x1, y1, x2, y2 = b["coordinate"]
            if len(xs):
                assert np.floor(x1) <= xs.min() and xs.max() < np.ceil(x2)
                assert np.floor(y1) <= ys.min() and ys.max() < np.ceil(y2)
    if name != "SOLOv2":
        assert shifted > 0, "every tiny model has a degenerate high-score box: PaddleX should misalign"
