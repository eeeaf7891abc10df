"""``instseg run -o Global.mode=evaluate`` for the keep-ratio families (R-CNN, SOLOv2).

MaskRCNN-ResNet50-FPN and SOLOv2 with the oracle-filled (synthetic) weights are evaluated on the
3 real COCO images of ``instances_val2017_mini8.json`` at ``Evaluate.input_size=320`` (AP is near
zero with these weights: only the pipeline is checked). The COCO results the evaluator scored for
one photo must match what the exported predictor (same input size) gives for that photo file:
evaluation preprocesses and post-processes exactly as inference does (the remaining difference is
dygraph vs static graph, within the export tests' tolerances).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from instseg_core.config import apply_overrides, load_config
from instseg_core.modes import run_config

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = REPO.parent / "shared" / "data" / "coco_tiny_val2017"
MINI8 = COCO_TINY / "annotations" / "instances_val2017_mini8.json"
INPUT_SIZE = 320  # Resize target [320, 533]: fast on CPU, still the keep-ratio + pad-32 path
PHOTO_ID = 5001  # 000000005001.jpg (480x640), the export tests' photo: detections with these weights
SCORE_TOL, BOX_TOL, MIN_IOU, MAX_XOR_PX = 1e-3, 1.0, 0.99, 64


def _cfg(model: str, overrides: list[str]) -> dict:
    return apply_overrides(load_config(REPO / "instseg_core" / "configs" / f"{model}.yaml"), overrides)


@pytest.fixture(scope="module")
def coco8(tmp_path_factory) -> Path:
    """PaddleX layout with 3 of the mini8 images (the export photo first) in both splits (evaluate
    reads the val split); 3 rather than 8 keeps the two R-CNN/SOLOv2 runs short on CPU."""
    if not MINI8.exists():
        pytest.skip("shared/data/coco_tiny_val2017 not available")
    root = tmp_path_factory.mktemp("coco8") / "ds"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    coco = json.loads(MINI8.read_text())
    images = sorted(coco["images"], key=lambda im: (im["id"] != PHOTO_ID, im["id"]))[:3]
    ids = {im["id"] for im in images}
    coco = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    for im in coco["images"]:
        shutil.copy(COCO_TINY / "val2017" / im["file_name"], root / "images" / im["file_name"])
    for split in ("train", "val"):
        (root / "annotations" / f"instance_{split}.json").write_text(json.dumps(coco))
    return root


def _oracle_pdparams(model: str, path: Path) -> Path:
    from oracle_utils import require_oracle, state_shapes, weights_rule

    require_oracle(model, ("state_dict.tsv",))
    import paddle

    weights = weights_rule().fill(state_shapes(model))
    paddle.save({k: np.asarray(v) for k, v in weights.items()}, str(path))
    return path


def _match(expected: list[dict], got: list[dict]) -> tuple[int, float, int]:
    """Greedy one-to-one matching of COCO results (same category, close score and box), highest
    score first; returns (unmatched count, worst mask IoU, largest mask |A xor B| in pixels)."""
    from instseg_core.masks import decode_rle

    exp_masks = decode_rle([r["segmentation"] for r in expected]) if expected else None
    got_masks = decode_rle([r["segmentation"] for r in got]) if got else None
    used, unmatched, worst_iou, worst_xor = set(), 0, 1.0, 0
    for i in sorted(range(len(expected)), key=lambda k: -expected[k]["score"]):
        e, best, best_d = expected[i], None, None
        for j, g in enumerate(got):
            if j in used or g["category_id"] != e["category_id"] or abs(g["score"] - e["score"]) > SCORE_TOL:
                continue
            d = float(np.abs(np.subtract(g["bbox"], e["bbox"])).max())
            if d <= BOX_TOL and (best_d is None or d < best_d):
                best, best_d = j, d
        if best is None:
            unmatched += 1
            continue
        used.add(best)
        a, b = exp_masks[i], got_masks[best]
        union = int(np.count_nonzero(a | b))
        worst_iou = min(worst_iou, 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union)
        worst_xor = max(worst_xor, int(np.count_nonzero(a ^ b)))
    return unmatched, worst_iou, worst_xor


@pytest.mark.slow
@pytest.mark.parametrize("model", ["MaskRCNN-ResNet50-FPN", "SOLOv2"])
def test_evaluate_matches_the_exported_predictor(model, coco8, tmp_path, monkeypatch):
    import cv2

    from instseg_core.export import export_model
    from instseg_core.inference.predictor import create_model
    from instseg_core.training import evaluator
    from instseg_core.training.data import CocoInstanceDataset

    weights = _oracle_pdparams(model, tmp_path / f"{model}.pdparams")
    # keep the COCO results the evaluation scores
    scored: list[dict] = []
    real = evaluator.predict_coco_results

    def spy(*args, **kwargs):
        results = real(*args, **kwargs)
        scored.extend(results)
        return results

    monkeypatch.setattr(evaluator, "predict_coco_results", spy)
    out = tmp_path / "out"
    cfg = _cfg(model, ["Global.mode=evaluate", f"Global.dataset_dir={coco8}", f"Global.output={out}",
                       "Global.device=cpu", f"Evaluate.weight_path={weights}", f"Evaluate.input_size={INPUT_SIZE}"])
    assert run_config(cfg) == 0, (out / "evaluate_result.json").read_text()

    record = json.loads((out / "evaluate_result.json").read_text())
    assert record["done_flag"] is True
    metrics = record["metrics"]
    assert metrics["AP"] == metrics["segm"]["AP"]
    for iou_type in ("segm", "bbox"):
        stats = metrics[iou_type]
        assert len(stats) >= 12, stats
        for name, v in stats.items():
            assert math.isfinite(v) and 0.0 <= v <= 1.0, (iou_type, name, v)
    assert {r["image_id"] for r in scored} <= {im["id"] for im in json.loads(MINI8.read_text())["images"]}

    # the exported predictor on the same photo, at the same input size
    infer = export_model(model, str(weights), tmp_path / "infer", input_size=INPUT_SIZE)
    pred = create_model(model_dir=infer, device="cpu")
    val = CocoInstanceDataset(coco8 / "annotations" / "instance_val.json", coco8 / "images")
    index = next(i for i, im in enumerate(val.images) if im["id"] == PHOTO_ID)
    inst = pred.predict_arrays([cv2.imread(str(coco8 / "images" / val.images[index]["file_name"]))],
                               threshold=0.0)[0]
    keep = inst.scores > 0  # the evaluation drops SOLOv2's zero-score padding row (score >= 0 keeps it)
    inst = type(inst)(inst.boxes[keep], inst.scores[keep], inst.class_ids[keep], inst.dense_masks()[keep],
                      inst.image_size, inst.boxes_from_masks)
    expected = evaluator.coco_results(inst, PHOTO_ID, val.category_ids)
    got = [r for r in scored if r["image_id"] == PHOTO_ID]
    unmatched, worst_iou, worst_xor = _match(expected, got)
    print(f"{model}: {len(scored)} results scored, photo {PHOTO_ID}: predictor {len(expected)}, "
          f"evaluation {len(got)}, unmatched {unmatched}, worst IoU {worst_iou:.4f}, worst xor {worst_xor}px")
    assert len(expected) >= 3, "too few detections to compare"
    assert len(got) == len(expected) and unmatched == 0
    assert worst_iou >= MIN_IOU or worst_xor <= MAX_XOR_PX


def test_evaluate_rejects_a_bad_input_size(coco8, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg("SOLOv2", ["Global.mode=evaluate", f"Global.dataset_dir={coco8}", f"Global.output={out}",
                          "Global.device=cpu", "Evaluate.weight_path=unused.pdparams", "Evaluate.input_size=300"])
    assert run_config(cfg) == 1
    err = json.loads((out / "evaluate_result.json").read_text())
    assert err["done_flag"] is False and "Evaluate.input_size must be a positive multiple of 32" in err["err_msg"]
