"""Bounded mask memory on large photos: the predictor's ``max_mask_side`` and the export's score floor.

Official PP-YOLOE_seg / Mask-RT-DETR graphs draw a full-image mask for every candidate they
output (``mask [M, H0, W0]`` with ``(H0, W0) = im_shape / scale_factor``), so their memory grows
with the photo, not with what the user keeps. ``_OfficialLikeGraph`` reproduces that behaviour in
a real saved Paddle program (no Paddle mocks): 100 candidates, 5 above 0.5, each with an int32
full-image ellipse mask computed from pixel coordinates inside its box.

Measured here (2-core VM, Paddle 3.3.1 CPU, 2 threads; peak RSS = ``VmHWM`` of a fresh subprocess
running one ``predict_arrays``):

* this graph, 4000x3000: 1.45 GB with the default max_mask_side (1333), 9.4 GB with None (measured
  once by hand, not run here) -> bound 2.2 GB;
* ``samples/model`` (the demo PP-YOLOE_seg export: score floor 0.05, uint8 masks), default limit:
  4000x3000 1.39 GB on the COCO photo (8.8 GB with None), 0.86 GB on the shapes grid (4.2 GB with
  None) -> bound 2.5 GB; 640x480 0.63 / 0.50 GB -> bound 1.0 GB;
* kept masks drawn on the reduced canvas and upsampled vs drawn at full size: IoU 0.990-0.997 for
  objects of hundreds of pixels (bound 0.985), 0.943-0.965 for a ~40 px one (bound 0.92).

``ru_maxrss`` is not used: under pytest the child's value carried the parent's peak (1.18 GB
reported for a child whose own peak was 0.63 GB), so the child reads its own ``VmHWM``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest
import yaml
from paddle.static import InputSpec

from instseg_core import create_model
from instseg_core.export import write_inference_yml
from instseg_core.inference.postprocess import upscale_mask
from instseg_core.inference.predictor import DEFAULT_MAX_MASK_SIDE
from instseg_core.inference.preprocess import collate
from instseg_core.masks import decode_rle

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "samples" / "model"

INPUT = 320  # the test graph's fixed square input (inference.yml: Resize 320x320, not keep-ratio)
NUM_CANDIDATES = 100
# The detections above 0.5, as [x1, y1, x2, y2] in *input* pixels (the graph divides by
# scale_factor): large, medium and elongated objects, and a small one (12 px, ~4% of the side).
KEPT_BOXES = [(20, 30, 150, 200), (160, 40, 300, 140), (50, 210, 130, 300), (180, 170, 310, 310),
              (240, 250, 252, 262)]
KEPT_SCORES = [0.95, 0.9, 0.8, 0.7, 0.6]


def _candidates() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, scores, boxes in input pixels) of the 100 candidates; the first 5 score > 0.5."""
    rng = np.random.RandomState(7)
    n_low = NUM_CANDIDATES - len(KEPT_BOXES)
    x1 = rng.uniform(0, INPUT - 40, n_low)
    y1 = rng.uniform(0, INPUT - 40, n_low)
    low = np.stack([x1, y1, x1 + rng.uniform(8, 120, n_low), y1 + rng.uniform(8, 120, n_low)], axis=1)
    boxes = np.concatenate([np.asarray(KEPT_BOXES, np.float64), np.minimum(low, INPUT)]).astype(np.float32)
    scores = np.concatenate([KEPT_SCORES, rng.uniform(0.01, 0.45, n_low)]).astype(np.float32)
    classes = (np.arange(NUM_CANDIDATES) % 4).astype(np.float32)
    return classes, scores, boxes


class _OfficialLikeGraph(paddle.nn.Layer):
    """``forward(im_shape, image, scale_factor)`` -> ``bbox [100, 6]``, ``bbox_num [1]``,
    ``mask [100, H0, W0]`` int32 with ``(H0, W0) = floor(im_shape / scale_factor)``: a full-image
    mask for every candidate, as official exports draw them (batch 1)."""

    def __init__(self):
        super().__init__()
        classes, scores, boxes = _candidates()
        self.register_buffer("classes", paddle.to_tensor(classes), persistable=False)
        self.register_buffer("scores", paddle.to_tensor(scores), persistable=False)
        self.register_buffer("boxes", paddle.to_tensor(boxes), persistable=False)

    def forward(self, im_shape, image, scale_factor):
        sy, sx = scale_factor[0, 0], scale_factor[0, 1]
        h0 = paddle.cast(paddle.floor(im_shape[0, 0] / sy), "int64")
        w0 = paddle.cast(paddle.floor(im_shape[0, 1] / sx), "int64")
        scale = paddle.stack([sx, sy, sx, sy]).reshape([1, 4])
        boxes = self.boxes / scale  # [100, 4] in original pixels
        # the image takes part in the scores (by 0 times its mean) so it stays an input of the program
        scores = self.scores + paddle.mean(image) * 0.0
        cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
        cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
        rx = (boxes[:, 2] - boxes[:, 0]) * 0.5
        ry = (boxes[:, 3] - boxes[:, 1]) * 0.5
        xc = paddle.arange(w0, dtype="float32") + 0.5  # pixel centres
        yc = paddle.arange(h0, dtype="float32") + 0.5
        dx = ((xc.unsqueeze(0) - cx.unsqueeze(1)) / rx.unsqueeze(1)) ** 2  # [100, W0]
        dy = ((yc.unsqueeze(0) - cy.unsqueeze(1)) / ry.unsqueeze(1)) ** 2  # [100, H0]
        mask = paddle.cast(dx.unsqueeze(1) + dy.unsqueeze(2) <= 1.0, "int32")  # [100, H0, W0]
        bbox = paddle.concat([self.classes.unsqueeze(1), scores.unsqueeze(1), boxes], axis=1)
        bbox_num = paddle.cast(im_shape[:, 0] * 0.0 + NUM_CANDIDATES, "int32")  # [1]
        return {"bbox": bbox, "bbox_num": bbox_num, "mask": mask}


@pytest.fixture(scope="module")
def official_like_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("official_like") / "infer"
    out.mkdir()
    net = _OfficialLikeGraph()
    net.eval()
    specs = [InputSpec([1, 2], "float32", "im_shape"), InputSpec([1, 3, INPUT, INPUT], "float32", "image"),
             InputSpec([1, 2], "float32", "scale_factor")]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found 'dict' in given outputs")
        paddle.jit.save(net, str(out / "inference"), input_spec=specs)
    write_inference_yml(out, "PP-YOLOE_seg-S", ["a", "b", "c", "d"], input_size=INPUT, batch_inference=False)
    return out


def _photo(w: int, h: int) -> np.ndarray:
    """A BGR uint8 image (smooth gradients; the test graph ignores its content)."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    return np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)


_CHILD = r"""
import json, resource, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["tests_dir"])
import cv2
from test_bounded_masks import _photo
from instseg_core import create_model
model = create_model(model_dir=args["model_dir"], device="cpu", cpu_threads=2, **args["kwargs"])
w, h = args["w"], args["h"]
image = cv2.resize(cv2.imread(args["photo"]), (w, h)) if args["photo"] else _photo(w, h)
(inst,) = model.predict_arrays([image])
with open("/proc/self/status") as f:  # this process's own peak (ru_maxrss can carry the parent's)
    hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"rss_gb": hwm_kb / 2**20, "n": len(inst), "mask_shape": list(inst.dense_masks().shape),
                  "areas": inst.areas().tolist(),
                  "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _predict_in_subprocess(model_dir: Path, w: int, h: int, photo: Path | None = None, **kwargs) -> dict:
    """Peak RSS (GB) and a summary of one ``predict_arrays`` on a w x h image (``photo`` resized, else
    :func:`_photo`) in a fresh interpreter; ``kwargs`` go to ``create_model``."""
    args = {"model_dir": str(model_dir), "w": w, "h": h, "photo": str(photo) if photo else None, "kwargs": kwargs,
            "tests_dir": str(Path(__file__).parent)}
    env = dict(os.environ, OMP_NUM_THREADS="2", GLOG_minloglevel="3")
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


# --- 1. an official-like graph: 100 candidates, full-image int32 masks for every one -------------

# oneDNN runs this graph's broadcast elementwise ops ~5x slower (no effect on what is measured)
FAST = {"device": "cpu", "cpu_threads": 2, "enable_onednn": False}


def test_official_like_graph_4000x3000_peak_rss_is_bounded(official_like_dir):
    r = _predict_in_subprocess(official_like_dir, 4000, 3000, enable_onednn=False)
    # measured: ~1.45 GB with the default max_mask_side (masks drawn on a 999x1333 canvas), 9.4 GB
    # with max_mask_side=None (100 x 3000 x 4000 int32 masks and their float intermediates)
    assert r["n"] == len(KEPT_BOXES) and r["mask_shape"] == [len(KEPT_BOXES), 3000, 4000]
    assert r["rss_gb"] < 2.2, r
    assert min(r["areas"]) > 10000  # the smallest kept object (a ~150x112 px ellipse) still has its mask


@pytest.mark.parametrize("w,h,side", [(1200, 900, 400), (1001, 757, 333)])
def test_reduced_canvas_masks_match_full_size_masks(official_like_dir, w, h, side):
    image = _photo(w, h)
    (full,) = create_model(model_dir=official_like_dir, max_mask_side=None, **FAST).predict_arrays([image])
    (bounded,) = create_model(model_dir=official_like_dir, max_mask_side=side, **FAST).predict_arrays([image])
    assert len(full) == len(bounded) == len(KEPT_BOXES)
    np.testing.assert_array_equal(bounded.class_ids, full.class_ids)
    np.testing.assert_allclose(bounded.scores, full.scores, atol=1e-6)
    np.testing.assert_allclose(bounded.boxes, full.boxes, atol=1.0)
    dense_b, dense_f = bounded.dense_masks(), full.dense_masks()
    assert dense_b.shape == dense_f.shape == (len(KEPT_BOXES), h, w)
    ious = [_iou(a, b) for a, b in zip(dense_b, dense_f)]
    # measured (1200x900 / 1001x757; also 2000x1500/500, 900x1200/400, 1500x1000/700): the four
    # large objects 0.990-0.997; the small one (~13x10 px on the reduced canvas) 0.943-0.965
    assert min(ious[:4]) >= 0.985, ious
    assert ious[4] >= 0.92, ious
    np.testing.assert_allclose(bounded.areas(), full.areas(), rtol=0.05)  # measured within 3.4%


@pytest.mark.parametrize("w,h,side", [(640, 480, DEFAULT_MAX_MASK_SIDE), (600, 450, 600), (450, 600, 600)])
def test_images_within_the_limit_are_bit_identical(official_like_dir, w, h, side):
    image = _photo(w, h)
    limited_model = create_model(model_dir=official_like_dir, max_mask_side=side, **FAST)
    # the graph is fed what PaddleX feeds it: scale_factor = input size / image size, untouched
    (sample,) = limited_model.preprocess([image])
    assert sample.mask_scale == 1.0
    np.testing.assert_array_equal(collate([sample])["scale_factor"], np.array([[INPUT / h, INPUT / w]], np.float32))
    (free,) = create_model(model_dir=official_like_dir, max_mask_side=None, **FAST).predict_arrays([image])
    (limited,) = limited_model.predict_arrays([image])
    assert len(free) == len(KEPT_BOXES)
    np.testing.assert_array_equal(limited.boxes, free.boxes)
    np.testing.assert_array_equal(limited.scores, free.scores)
    np.testing.assert_array_equal(limited.class_ids, free.class_ids)
    np.testing.assert_array_equal(limited.dense_masks(), free.dense_masks())


@pytest.mark.parametrize("w,h,side", [(1200, 900, 400), (640, 480, DEFAULT_MAX_MASK_SIDE)])
def test_rle_masks_decode_to_the_dense_masks(official_like_dir, w, h, side):
    model = create_model(model_dir=official_like_dir, max_mask_side=side, **FAST)
    image = _photo(w, h)
    (dense,) = model.predict_arrays([image])
    (rle,) = model.predict_arrays([image], rle=True)
    assert rle.is_rle and len(rle.masks) == len(dense) == len(KEPT_BOXES)
    assert all(isinstance(m, dict) and m["size"] == [h, w] for m in rle.masks)
    np.testing.assert_array_equal(rle.boxes, dense.boxes)
    np.testing.assert_array_equal(decode_rle(rle.masks), dense.dense_masks())


# --- 2. argument checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 10, 31, 1.5, True, "x", 1333.0])
def test_create_model_rejects_bad_max_mask_side(official_like_dir, bad):
    with pytest.raises(ValueError, match="max_mask_side"):
        create_model(model_dir=official_like_dir, max_mask_side=bad)


@pytest.mark.parametrize("good", [None, 32, np.int64(2000)])
def test_create_model_accepts_good_max_mask_side(official_like_dir, good):
    model = create_model(model_dir=official_like_dir, max_mask_side=good)
    assert model.max_mask_side == (None if good is None else int(good))


@pytest.mark.parametrize("bad", [2, -0.1, float("nan")])
def test_bad_threshold_rejected_at_create_and_at_predict(official_like_dir, bad):
    with pytest.raises(ValueError, match="threshold"):
        create_model(model_dir=official_like_dir, threshold=bad)
    model = create_model(model_dir=official_like_dir, **FAST)
    with pytest.raises(ValueError, match="threshold"):
        model.predict_arrays([_photo(64, 48)], threshold=bad)


# --- 3. the shipped demo model (a real PP-YOLOE_seg export, score floor 0.05, uint8 masks) ---------

def _demo_photo(tmp_path: Path) -> Path:
    """A COCO photo when ../shared has them (as conftest's ``test_images``; the demo model finds 16
    shapes above 0.5 and draws masks for ~125 detections above its 0.05 floor), else a 2x2 grid of
    the bundled shapes images (7 kept, ~55 above the floor)."""
    coco = REPO.parent / "shared" / "data" / "coco_tiny_val2017" / "val2017" / "000000005001.jpg"
    if coco.is_file():
        return coco
    ims = [cv2.imread(str(p)) for p in sorted((REPO / "samples" / "shapes").glob("*.jpg"))[:4]]
    path = tmp_path / "grid.png"
    cv2.imwrite(str(path), np.vstack([np.hstack(ims[:2]), np.hstack(ims[2:])]))
    return path


@pytest.mark.parametrize("w,h,bound_gb", [(4000, 3000, 2.5), (640, 480, 1.0)])
def test_demo_model_peak_rss_is_bounded(tmp_path, w, h, bound_gb):
    # measured 4000x3000: 1.39 GB (COCO photo; 8.8 GB with max_mask_side=None) / 0.86 GB (grid;
    # 4.2 GB with None); 640x480: 0.63 GB / 0.50 GB
    r = _predict_in_subprocess(DEMO, w, h, photo=_demo_photo(tmp_path))
    assert r["n"] > 0 and r["mask_shape"] == [r["n"], h, w]
    assert r["rss_gb"] < bound_gb, r


def test_demo_model_declares_its_score_floor_and_draws_uint8_masks(tmp_path):
    assert yaml.safe_load((DEMO / "inference.yml").read_text())["score_floor"] == 0.05
    model = create_model(model_dir=DEMO, device="cpu")
    image = cv2.resize(cv2.imread(str(_demo_photo(tmp_path))), (4000, 3000))
    samples = model.preprocess([image])
    bbox, bbox_num, mask = model.engine.run(collate(samples))
    assert mask.dtype == np.uint8
    assert int(bbox_num.sum()) == len(bbox) == len(mask) > 0
    assert (bbox[:, 1] > 0.05).all()  # nothing at or below the floor got a mask
    # the graph drew on the reduced canvas (1333 x ~1000), not on the 4000 x 3000 photo
    assert mask.shape[1:] in [(999, 1333), (1000, 1333)], mask.shape


# --- 4. upscale_mask ----------------------------------------------------------------------------

def _disk(hw: tuple[int, int], centre: tuple[float, float], radius: float, scale: float = 1.0) -> np.ndarray:
    """A disk in full-image pixels, drawn on a grid ``scale`` times the image's size (pixel centres of
    that grid at full-image coordinates ``(j + 0.5) / scale``)."""
    h, w = (int(np.ceil(hw[0] * scale)), int(np.ceil(hw[1] * scale))) if scale != 1.0 else hw
    ys = (np.arange(h) + 0.5)[:, None] / scale
    xs = (np.arange(w) + 0.5)[None, :] / scale
    return (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius**2


def test_upscale_mask_restores_a_disk_drawn_at_quarter_scale():
    hw, centre, radius = (401, 599), (300.3, 190.7), 120.0
    small = _disk(hw, centre, radius, scale=0.25)
    assert small.shape == (101, 150)
    up = upscale_mask(small, hw, 0.25)
    full = _disk(hw, centre, radius)
    assert up.shape == hw and up.dtype == bool
    iou = _iou(up, full)
    assert iou >= 0.97, iou  # measured 0.987
    assert abs(int(up.sum()) / int(full.sum()) - 1) < 0.01  # measured 0.9997
    # no half-pixel shift: the centroid is where the disk is (measured within 0.1 px; half a pixel
    # of the small grid is 2 px here)
    ys, xs = np.nonzero(up)
    assert abs(xs.mean() + 0.5 - centre[0]) < 0.5 and abs(ys.mean() + 0.5 - centre[1]) < 0.5
    # a smooth edge, not nearest's staircase (which repeats each row 4 times: <= 1/4 of the rows
    # differ from the one above); measured 0.52 (0.75 for the disk drawn at full size, 0.17 nearest)
    rows = up[np.flatnonzero(up.any(axis=1))]
    assert np.mean((rows[1:] != rows[:-1]).any(axis=1)) > 0.4


def test_upscale_mask_keeps_an_empty_mask_empty():
    up = upscale_mask(np.zeros((101, 150), bool), (401, 599), 0.25)
    assert up.shape == (401, 599) and up.dtype == bool and not up.any()


def test_threshold_below_the_graphs_score_floor_warns_once(caplog):
    """A threshold under the export's ``score_floor`` cannot show what the graph dropped: say so."""
    import logging


    from instseg_core import create_model

    model = create_model(model_dir=DEMO, device="cpu")
    assert model.score_floor == 0.05
    img = cv2.imread(str(sorted((REPO / "samples" / "shapes").glob("*.jpg"))[0]))
    with caplog.at_level(logging.WARNING, logger="instseg"):
        model.predict_arrays([img], threshold=0.5)
        assert "score_floor" not in caplog.text
        for _ in range(2):
            model.predict_arrays([img], threshold=0.01)
    assert caplog.text.count("below the graph's score_floor 0.05") == 1


def test_cli_max_mask_side_and_threshold_are_checked(capsys):
    from instseg_core.cli import main

    img = str(REPO / "samples" / "shapes_0.jpg")
    for flag, value, word in (("--max-mask-side", "10", "max_mask_side"), ("--max-mask-side", "big", "--max-mask-side"),
                              ("--threshold", "2", "threshold")):
        assert main(["predict", "--model-dir", str(DEMO), "--input", img, "--quiet", flag, value]) == 2
        assert word in capsys.readouterr().err
    assert main(["predict", "--model-dir", str(DEMO), "--input", img, "--quiet", "--max-mask-side", "none"]) == 0

