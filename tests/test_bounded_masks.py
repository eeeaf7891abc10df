"""Bounded mask memory on large photos: the predictor's ``max_mask_side`` and the export's score floor.

Official PP-YOLOE_seg / Mask-RT-DETR graphs draw a full-image mask for every candidate they
output (``mask [M, H0, W0]`` with ``(H0, W0) = im_shape / scale_factor``), so their memory grows
with the photo, not with what the user keeps. ``_OfficialLikeGraph`` below reproduces exactly that
behaviour with a real saved Paddle program (no Paddle mocks): 100 candidates, 5 above 0.5, each
with an int32 full-image ellipse mask computed from pixel coordinates inside its box.

Measured on this machine (2 CPU threads, Paddle 3.3.1 CPU; peak RSS = ``ru_maxrss`` of a fresh
subprocess running one ``predict_arrays``):

* this graph on a 4000x3000 photo: max_mask_side=None ~{FULL_4000} GB (measured once by hand, not
  run here: too heavy), default 1333: ~{DEFAULT_4000} GB -> bound {BOUND_4000} GB;
* ``samples/model`` (the re-exported demo PP-YOLOE_seg, score floor 0.05, uint8 masks): 4000x3000
  ~{DEMO_4000} GB (bound 2.5), 640x480 ~{DEMO_640} GB (bound 1.0);
* reduced-canvas vs full-size masks of the kept detections: IoU >= {IOU_MIN} (bound {IOU_BOUND}).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

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
# scale_factor): large, medium, elongated and small objects (the last one ~1% of the side).
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
print(json.dumps({"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "n": len(inst),
                  "mask_shape": list(inst.dense_masks().shape), "areas": inst.areas().tolist()}))
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
