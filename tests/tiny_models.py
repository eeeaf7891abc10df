"""Tiny but real Paddle networks with the exported signature of each instance-segmentation family.

The official models are too big (and not downloadable here) for tests and the offline demo, so
these stand-ins reproduce only the *interface*: the three named inputs, the number, order, dtype
and shape of the outputs, and a PaddleX-format inference dir (``inference.json`` +
``inference.pdiparams`` + ``inference.yml``). What they "detect" is arbitrary but deterministic and
image-dependent: a seeded two-layer conv turns a fixed-size resample of the image into K "instance
slot" maps. Slot k gets

* ``score_k = sigmoid(bias_k + tanh(mean(logits_k)))``: ``bias_k`` pins each slot clearly above or
  below 0.5 on any image, the tanh term makes the score depend on the image;
* a fixed class ``(7 * k) % num_classes`` and a fixed fractional box scaled to the original size;
* a full-image mask ``upsample(logits_k - mean(logits_k)) > 0`` restricted to the box.

Deliberate features the predictor's tests rely on: slots 3 and 5 score below 0.5, and for the
box families slot 1 has a high score and a box that lies right of the image (degenerate once
clipped) *before* the other high-score slots 2 and 4, which exercises PaddleX's mask/box pairing
quirk when degenerate boxes are dropped.

Batching is real and exact: each image is resampled from its own unpadded region (``im_shape``)
with integer gather indices and upsampled on a per-image grid, so a padded batch gives bit-for-bit
the per-image results of running the images alone (no float drift that could flip mask pixels).

Test and benchmark scaffolding, not part of the package: tests import it as ``tiny_models`` (pytest
puts ``tests/`` on ``sys.path``), benchmarks after adding ``tests/`` to it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.static import InputSpec

from instseg_core.export import write_inference_yml
from instseg_core.families import CASCADE_RCNN, FAMILIES as FAMILY_RECORDS, MASKRCNN, PPYOLOE_SEG, SOLOV2
from instseg_core.models import get_spec

__all__ = ["FAMILIES", "INPUT_NAMES", "NUM_SLOTS", "OUTPUT_NAMES", "build_tiny_model", "export_tiny_model", "input_specs"]

FAMILIES: tuple[str, ...] = tuple(FAMILY_RECORDS)
INPUT_NAMES: tuple[str, ...] = ("im_shape", "image", "scale_factor")
# Output order of the saved program (PIR names them fetch_name_0..): sorted keys of the dict.
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {name: f.output_keys for name, f in FAMILY_RECORDS.items()}


_SAMPLE = 64  # the image is resampled to _SAMPLE x _SAMPLE, then avg-pooled 2x: cheap at any size
_HIDDEN = 8

# Per slot: score bias and fractional box (x1, y1, x2, y2) of the original image.
_SLOT_BIAS = (2.0, 3.0, 1.5, -2.0, 2.5, -1.5)  # scores roughly: .73-.95, .88-.98, .62-.92, <.27, .82-.97, <.38
_BOXES = (
    (0.05, 0.10, 0.55, 0.70),
    (1.05, 0.20, 1.20, 0.60),  # right of the image: x1 >= x2 once clipped (box families)
    (0.40, 0.30, 0.95, 0.95),
    (0.10, 0.50, 0.45, 0.90),
    (0.60, -0.05, 1.10, 0.40),  # sticks out top/right: clipped by R-CNN/PP-YOLOE, raw for DETR
    (0.25, 0.25, 0.75, 0.75),
)
# SOLOv2 has no boxes, so its slot 1 gets an ordinary region (an empty mask would be pointless).
_SOLOV2_BOXES = (_BOXES[0], (0.70, 0.20, 0.95, 0.60)) + _BOXES[2:]
NUM_SLOTS = len(_SLOT_BIAS)


class TinyInstSegNet(nn.Layer):
    """A seeded conv net emitting the raw outputs of one family (see the module docstring).

    ``forward(im_shape, image, scale_factor)`` returns a dict; under ``paddle.jit.save`` its
    values come out in sorted-key order, which is the order PaddleX indexes them by.
    """

    def __init__(self, family: str, num_classes: int = 80, seed: int = 0):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of: {', '.join(FAMILIES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.family = family
        self.num_classes = num_classes
        self.conv1 = nn.Conv2D(3, _HIDDEN, 3, padding=1)
        self.conv2 = nn.Conv2D(_HIDDEN, NUM_SLOTS, 3, padding=1, bias_attr=False)
        # Weights from a numpy RNG, not paddle's global one: the same seed gives the same model
        # whatever else the process has drawn.
        rng = np.random.RandomState(seed)
        self.conv1.weight.set_value(rng.normal(0.0, 0.5, self.conv1.weight.shape).astype("float32"))
        self.conv1.bias.set_value(rng.normal(0.0, 0.1, self.conv1.bias.shape).astype("float32"))
        self.conv2.weight.set_value(rng.normal(0.0, 0.3, self.conv2.weight.shape).astype("float32"))

        boxes = _SOLOV2_BOXES if family == SOLOV2 else _BOXES
        classes = [(7 * k) % num_classes for k in range(NUM_SLOTS)]
        # Constants as non-persistable buffers: baked into the program, not into pdiparams.
        self.register_buffer("slot_bias", paddle.to_tensor(_SLOT_BIAS, dtype="float32"), persistable=False)
        self.register_buffer("slot_boxes", paddle.to_tensor(boxes, dtype="float32"), persistable=False)
        self.register_buffer("slot_classes", paddle.to_tensor(classes, dtype="float32"), persistable=False)

    # -- pieces ---------------------------------------------------------------------------------

    @staticmethod
    def _resample(image: paddle.Tensor, im_shape: paddle.Tensor) -> paddle.Tensor:
        """Nearest-sample each image's unpadded region to [N,3,_SAMPLE,_SAMPLE].

        Integer gather indices (computed from that image's own h', w' only) make the result
        independent of how much padding the batch added.
        """
        n = paddle.shape(image)[0]
        hp = paddle.shape(image)[2]
        wp = paddle.shape(image)[3]
        steps = (paddle.arange(_SAMPLE, dtype="float32") + 0.5) / _SAMPLE  # [S]
        h = im_shape[:, 0:1]
        w = im_shape[:, 1:2]
        hmax = paddle.cast(hp, "float32") - 1.0
        wmax = paddle.cast(wp, "float32") - 1.0
        iy = paddle.clip(paddle.floor(steps.unsqueeze(0) * h), min=0.0)  # [N,S]
        ix = paddle.clip(paddle.floor(steps.unsqueeze(0) * w), min=0.0)
        iy = paddle.minimum(paddle.minimum(iy, h - 1.0), hmax.reshape([1, 1]))
        ix = paddle.minimum(paddle.minimum(ix, w - 1.0), wmax.reshape([1, 1]))
        iy = paddle.cast(iy, "int64")
        ix = paddle.cast(ix, "int64")
        flat = iy.unsqueeze(2) * paddle.cast(wp, "int64") + ix.unsqueeze(1)  # [N,S,S]
        flat = flat.reshape([n, 1, _SAMPLE * _SAMPLE]).expand([n, 3, _SAMPLE * _SAMPLE])
        pixels = paddle.take_along_axis(image.reshape([n, 3, -1]), flat, axis=2, broadcast=False)
        return pixels.reshape([n, 3, _SAMPLE, _SAMPLE])

    @staticmethod
    def _upsample(maps: paddle.Tensor, h0: paddle.Tensor, w0: paddle.Tensor, hmax, wmax) -> paddle.Tensor:
        """Bilinear (half-pixel) upsampling of [N,K,s,s] to each image's own [h0_i, w0_i], laid out
        on a common [Hmax, Wmax] canvas: [N,K,Hmax,Wmax] (values outside an image are garbage)."""
        n = paddle.shape(maps)[0]
        xs = paddle.arange(wmax, dtype="float32") + 0.5  # [Wmax]
        ys = paddle.arange(hmax, dtype="float32") + 0.5
        gx = 2.0 * xs.unsqueeze(0) / w0.unsqueeze(1) - 1.0  # [N,Wmax]
        gy = 2.0 * ys.unsqueeze(0) / h0.unsqueeze(1) - 1.0  # [N,Hmax]
        shape = paddle.stack([n, paddle.cast(hmax, n.dtype), paddle.cast(wmax, n.dtype)])
        gx = gx.unsqueeze(1).expand(shape)
        gy = gy.unsqueeze(2).expand(shape)
        grid = paddle.stack([gx, gy], axis=-1)  # grid_sample wants (x, y)
        return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, im_shape: paddle.Tensor, image: paddle.Tensor, scale_factor: paddle.Tensor) -> dict:
        n = paddle.shape(image)[0]
        x = F.avg_pool2d(self._resample(image, im_shape), 2)
        logits = self.conv2(F.relu(self.conv1(x)))  # [N,K,s,s]
        mean = logits.mean(axis=[2, 3])  # [N,K]
        scores = F.sigmoid(self.slot_bias.unsqueeze(0) + paddle.tanh(mean))  # [N,K]
        centred = logits - mean.unsqueeze(-1).unsqueeze(-1)

        # Original size, as the post-processors recover it.
        h0 = paddle.floor(im_shape[:, 0] / scale_factor[:, 0] + 0.5)  # [N]
        w0 = paddle.floor(im_shape[:, 1] / scale_factor[:, 1] + 0.5)
        hmax = paddle.cast(paddle.max(h0), "int64")
        wmax = paddle.cast(paddle.max(w0), "int64")

        wh = paddle.stack([w0, h0, w0, h0], axis=1).unsqueeze(1)  # [N,1,4]
        boxes = self.slot_boxes.unsqueeze(0) * wh  # [N,K,4] x1,y1,x2,y2 in original pixels
        if self.family in (MASKRCNN, CASCADE_RCNN, PPYOLOE_SEG):
            boxes = paddle.minimum(paddle.clip(boxes, min=0.0), wh)

        # Pixel-centre masks: in the image, in the box, and where the slot map is positive.
        up = self._upsample(centred, h0, w0, hmax, wmax)  # [N,K,H,W]
        xc = (paddle.arange(wmax, dtype="float32") + 0.5).reshape([1, 1, 1, -1])
        yc = (paddle.arange(hmax, dtype="float32") + 0.5).reshape([1, 1, -1, 1])
        bx = boxes.unsqueeze(-1).unsqueeze(-1)  # [N,K,4,1,1]
        in_box = (xc >= bx[:, :, 0]) & (xc < bx[:, :, 2]) & (yc >= bx[:, :, 1]) & (yc < bx[:, :, 3])
        in_img = (xc < w0.reshape([-1, 1, 1, 1])) & (yc < h0.reshape([-1, 1, 1, 1]))  # [N,1,H,W]
        fg = (up > 0.0) & in_box & in_img

        classes = self.slot_classes.unsqueeze(0).expand_as(scores)
        # K rows per image (no NMS, no score cut). Not full_like: it queries .place, which PIR lacks.
        per_image = im_shape[:, 0] * 0.0 + NUM_SLOTS
        mask_shape = paddle.stack([n * NUM_SLOTS, paddle.cast(hmax, n.dtype), paddle.cast(wmax, n.dtype)])
        if self.family == SOLOV2:
            # Per image: rows sorted by score, descending (as SOLOv2's matrix-NMS output is).
            order = paddle.argsort(scores, axis=1, descending=True)  # [N,K]
            flat = (order + paddle.arange(n, dtype=order.dtype).unsqueeze(1) * NUM_SLOTS).reshape([-1])
            segm = paddle.gather(paddle.cast(fg, "uint8").reshape(mask_shape), flat)
            return {
                "bbox_num": paddle.cast(per_image, "int64"),
                "cate_label": paddle.gather(paddle.cast(classes, "int64").reshape([-1]), flat),
                "cate_score": paddle.gather(scores.reshape([-1]), flat),
                "segm": segm,
            }

        if self.family == PPYOLOE_SEG:
            mask = paddle.cast(fg, "float32")  # padding stays 0.
        else:
            # 0/1 inside the image, -1 on the padding up to the largest image of the batch.
            mask = paddle.cast(fg, "int32") + paddle.cast(in_img, "int32") - 1  # fg implies in_img
        bbox = paddle.concat([classes.unsqueeze(-1), scores.unsqueeze(-1), boxes], axis=-1)  # [N,K,6]
        return {
            "bbox": bbox.reshape([-1, 6]),
            "bbox_num": paddle.cast(per_image, "int32"),
            "mask": mask.reshape(mask_shape),
        }


def build_tiny_model(family: str, num_classes: int = 80, seed: int = 0) -> paddle.nn.Layer:
    """A tiny network (in eval mode) with the raw-output signature of ``family``."""
    model = TinyInstSegNet(family, num_classes=num_classes, seed=seed)
    model.eval()
    return model


def input_specs() -> list[InputSpec]:
    """The three named, dynamic-shape inputs every family is exported with."""
    return [
        InputSpec([-1, 2], "float32", "im_shape"),
        InputSpec([-1, 3, -1, -1], "float32", "image"),
        InputSpec([-1, 2], "float32", "scale_factor"),
    ]


def export_tiny_model(
    model_name: str,
    output_dir: str | os.PathLike,
    *,
    input_size: int | None = None,
    num_classes: int | None = None,
    labels: list[str] | None = None,
    seed: int = 0,
    draw_threshold: float = 0.5,
    with_model_name: bool = True,
) -> Path:
    """Export the tiny network of ``model_name``'s family as a PaddleX-format inference dir.

    Writes ``inference.json`` + ``inference.pdiparams`` (PIR) and ``inference.yml`` into
    ``output_dir`` (created if needed) and returns it. ``input_size`` shrinks the Resize target
    (keep-ratio models: ``[s, int(s*5/3)]``, others ``[s, s]``) so tests run on small tensors.
    ``num_classes`` defaults to ``len(labels)`` or 80; ``labels`` default to the spec's labels
    (names ``class<i>`` beyond them).
    """
    spec = get_spec(model_name)
    if num_classes is None:
        num_classes = len(labels) if labels is not None else 80
    if labels is None:
        labels = list(spec.labels[:num_classes]) + [f"class{i}" for i in range(len(spec.labels), num_classes)]
    elif len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for num_classes={num_classes}")
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(spec.family, num_classes=num_classes, seed=seed)
    with warnings.catch_warnings():
        # The dict-output warning is the point: its sorted-key order is the output order.
        warnings.filterwarnings("ignore", message="Found 'dict' in given outputs")
        paddle.jit.save(model, str(out / "inference"), input_spec=input_specs())

    write_inference_yml(out, model_name, labels, draw_threshold=draw_threshold, input_size=input_size,
                        with_model_name=with_model_name)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python tests/tiny_models.py --model NAME --output DIR``: export a tiny model dir (skipped
    when DIR already holds one)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="MaskRCNN-ResNet50-FPN")
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.output)
    if (out / "inference.yml").is_file() and (out / "inference.pdiparams").is_file():
        print(f"tiny model already at {out}")
        return
    export_tiny_model(args.model, out, seed=args.seed)
    print(f"exported tiny {args.model} to {out}")


if __name__ == "__main__":
    main()
