"""PP-YOLOE_seg instance head: ESE stems, class / DFL-box / mask-coefficient branches, prototypes.

Written from the reference notes (``shared/reference/ppdet_models.md`` section 2.4) and checked
against the oracle features ``feat/yolo_head/0..5``. Sub-layer attribute names are part of the
state-dict contract: ``stem_{cls,reg,ins}.{i}.{fc,conv}``, ``pred_{cls,reg,ins}.{i}``,
``proj_conv``, ``proto.{conv1,upsample,conv2,conv3}``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from instseg_core.modeling.layers import ActLike, ConvBNLayer, get_activation
from instseg_core.modeling.resize import bilinear_matrix, bilinear_taps


class ESEAttn(nn.Layer):
    """conv(feat * sigmoid(fc(avg_feat))): ``fc`` a 1x1 conv with bias, ``conv`` a 1x1 ConvBN + act."""

    def __init__(self, channels: int, act: ActLike = "swish"):
        super().__init__()
        self.fc = nn.Conv2D(channels, channels, kernel_size=1)
        self.conv = ConvBNLayer(channels, channels, 1, act=act)

    def forward(self, feat, avg_feat):
        return self.conv(feat * F.sigmoid(self.fc(avg_feat)))


class MaskProto(nn.Layer):
    """conv1 (3x3) -> 2x transposed conv -> conv2 (3x3) -> conv3 (1x1 to ``num_masks``)."""

    def __init__(self, ch_in: int, num_protos: int = 256, num_masks: int = 32, act: ActLike = "swish"):
        super().__init__()
        self.conv1 = ConvBNLayer(ch_in, num_protos, 3, padding=1, act=act)
        self.upsample = nn.Conv2DTranspose(num_protos, num_protos, kernel_size=2, stride=2)
        self.conv2 = ConvBNLayer(num_protos, num_protos, 3, padding=1, act=act)
        self.conv3 = ConvBNLayer(num_protos, num_masks, 1, act=act)

    def forward(self, x):
        return self.conv3(self.conv2(self.upsample(self.conv1(x))))


def _nms_multiclass(bboxes, scores, score_threshold, nms_top_k, keep_top_k, nms_threshold,
                    normalized=True, nms_eta=1.0, background_label=-1):
    """Paddle's multiclass_nms3 kernel: returns (out [N,6], index [N,1], rois_num [B])."""
    out, index, rois_num = paddle._C_ops.multiclass_nms3(
        bboxes, scores, None, score_threshold, nms_top_k, keep_top_k, nms_threshold, normalized,
        nms_eta, background_label)
    return out, index, rois_num


class TrainOutputs(NamedTuple):
    """Training-time head outputs over all A anchors (levels coarsest first).

    Boxes are in stride units: ``anchor_points`` are cell centres ``(i + 0.5, j + 0.5)`` and
    ``distances`` ltrb distances, both to be multiplied by ``strides`` for input pixels.
    """

    cls_logits: paddle.Tensor  # [B, A, C] class logits (before sigmoid)
    reg_logits: paddle.Tensor  # [B, A, 4, R+1] DFL logits per side (l, t, r, b)
    distances: paddle.Tensor  # [B, A, 4] expectation of the softmaxed DFL bins
    coefs: paddle.Tensor  # [B, A, M] mask coefficients
    protos: paddle.Tensor  # [B, M, H/4, W/4] mask prototypes
    anchor_points: paddle.Tensor  # [A, 2] x, y
    strides: paddle.Tensor  # [A, 1]


class PPYOLOEInsHead(nn.Layer):
    """Anchor-free PP-YOLOE head with a YOLACT-style mask branch.

    ``forward(feats)`` takes the neck outputs (strides 32, 16, 8) and returns, in eval mode,
    ``(scores [B,C,A] after sigmoid, ltrb distances [B,A,4] in stride units, mask coefficients
    [B,M,A], prototypes [B,M,2H8,2W8], anchor points [A,2], strides [A,1])``. Anchors are
    generated from the actual feature-map sizes (grid + 0.5, in stride units), coarsest first.
    """

    def __init__(self, in_channels: Sequence[int] = (384, 192, 96), num_classes: int = 80,
                 act: ActLike = "swish", fpn_strides: Sequence[int] = (32, 16, 8),
                 grid_cell_offset: float = 0.5, reg_max: int = 16, num_masks: int = 32,
                 num_protos: int = 128, score_threshold: float = 0.01, nms_top_k: int = 1000,
                 keep_top_k: int = 300, nms_threshold: float = 0.7, mask_threshold: float = 0.5):
        super().__init__()
        in_channels = list(in_channels)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.fpn_strides = list(fpn_strides)
        self.grid_cell_offset = grid_cell_offset
        self.reg_max = reg_max
        self.num_masks = num_masks
        self.score_threshold = score_threshold
        self.nms_top_k = nms_top_k
        self.keep_top_k = keep_top_k
        self.nms_threshold = nms_threshold
        self.mask_threshold = mask_threshold
        act_fn = get_activation(act)

        self.stem_cls = nn.LayerList([ESEAttn(c, act=act_fn) for c in in_channels])
        self.stem_reg = nn.LayerList([ESEAttn(c, act=act_fn) for c in in_channels])
        self.stem_ins = nn.LayerList([ESEAttn(c, act=act_fn) for c in in_channels])
        self.pred_cls = nn.LayerList(
            [nn.Conv2D(c, num_classes, 3, padding=1) for c in in_channels])
        self.pred_reg = nn.LayerList(
            [nn.Conv2D(c, 4 * (reg_max + 1), 3, padding=1) for c in in_channels])
        self.pred_ins = nn.LayerList(
            [nn.Conv2D(c, num_masks, 3, padding=1) for c in in_channels])
        # DFL projection: a fixed 1x1 conv with weights 0..reg_max (KEEP key, never learned).
        self.proj_conv = nn.Conv2D(reg_max + 1, 1, 1, bias_attr=False)
        self.proj_conv.weight.stop_gradient = True
        self._init_proj()
        self.proto = MaskProto(in_channels[-1], num_protos, num_masks, act=act_fn)

    def _init_proj(self):
        proj = np.arange(self.reg_max + 1, dtype="float32").reshape([1, self.reg_max + 1, 1, 1])
        self.proj_conv.weight.set_value(proj)

    def init_prediction_priors(self, prior_prob: float = 0.01) -> None:
        """The reference start for training the prediction convs from scratch (not called by default).

        ``pred_cls``: zero weights and bias ``-log((1 - p) / p)`` so every class starts at
        probability ``prior_prob`` (the background-heavy prior keeps the first varifocal losses
        small); ``pred_reg``: zero weights and bias 1 (uniform DFL bins). Call it on a head whose
        prediction layers are not loaded from a checkpoint, e.g. after changing the class count.
        """
        bias_cls = float(-np.log((1.0 - prior_prob) / prior_prob))
        for cls_conv, reg_conv in zip(self.pred_cls, self.pred_reg):
            cls_conv.weight.set_value(paddle.zeros_like(cls_conv.weight))
            cls_conv.bias.set_value(paddle.full_like(cls_conv.bias, bias_cls))
            reg_conv.weight.set_value(paddle.zeros_like(reg_conv.weight))
            reg_conv.bias.set_value(paddle.ones_like(reg_conv.bias))

    # ---------------------------------------------------------------- anchors
    def generate_anchors(self, feats: Sequence[paddle.Tensor]) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Anchor points [A,2] (feature-map cells) and strides [A,1] for the levels' feature maps."""
        return self.anchors_for_sizes([(int(f.shape[2]), int(f.shape[3])) for f in feats])

    def anchors_for_input(self, input_hw: Sequence[int]) -> tuple[paddle.Tensor, paddle.Tensor]:
        """:meth:`generate_anchors` for an input of ``input_hw`` (multiples of the largest stride)."""
        return self.anchors_for_sizes([(int(input_hw[0]) // s, int(input_hw[1]) // s) for s in self.fpn_strides])

    def anchors_for_sizes(self, sizes: Sequence[tuple[int, int]]) -> tuple[paddle.Tensor, paddle.Tensor]:
        points, strides = [], []
        for (h, w), stride in zip(sizes, self.fpn_strides):
            sx = paddle.arange(w, dtype="float32") + self.grid_cell_offset
            sy = paddle.arange(h, dtype="float32") + self.grid_cell_offset
            gy, gx = paddle.meshgrid(sy, sx)
            points.append(paddle.stack([gx, gy], axis=-1).reshape([-1, 2]))
            strides.append(paddle.full([h * w, 1], float(stride), dtype="float32"))
        return paddle.concat(points), paddle.concat(strides)

    # ---------------------------------------------------------------- forward
    def _level_logits(self, i: int, feat: paddle.Tensor):
        """Raw outputs of level ``i``: class logits [B,C,H,W], DFL logits [B,4(R+1),H,W]
        (side-major: channel ``side * (R+1) + bin``) and mask coefficients [B,M,H,W]."""
        avg_feat = F.adaptive_avg_pool2d(feat, (1, 1))
        cls_logit = self.pred_cls[i](self.stem_cls[i](feat, avg_feat) + feat)
        reg = self.pred_reg[i](self.stem_reg[i](feat, avg_feat))
        coef = self.pred_ins[i](self.stem_ins[i](feat, avg_feat) + feat)
        return cls_logit, reg, coef

    def _protos_and_anchors(self, feats: Sequence[paddle.Tensor]):
        """``(feats as a list, prototypes of the stride-8 map, anchor points, strides)``."""
        feats = list(feats)
        if len(feats) != len(self.fpn_strides):
            raise ValueError(f"expected {len(self.fpn_strides)} feature maps, got {len(feats)}")
        anchor_points, stride_tensor = self.generate_anchors(feats)
        return feats, self.proto(feats[-1]), anchor_points, stride_tensor

    def forward_train(self, feats: Sequence[paddle.Tensor]) -> TrainOutputs:
        """The head's raw outputs for the training losses (see :class:`TrainOutputs`).

        Same layers as :meth:`forward`, but class logits instead of sigmoid scores and the DFL
        logits kept next to their expectation, all anchors-major ([B, A, ...]).
        """
        feats, protos, anchor_points, stride_tensor = self._protos_and_anchors(feats)
        cls_list, reg_list, ins_list = [], [], []
        for i, feat in enumerate(feats):
            cls_logit, reg, coef = self._level_logits(i, feat)
            l = feat.shape[2] * feat.shape[3]
            cls_list.append(cls_logit.reshape([-1, self.num_classes, l]).transpose([0, 2, 1]))
            reg_list.append(reg.reshape([-1, 4, self.reg_max + 1, l]).transpose([0, 3, 1, 2]))
            ins_list.append(coef.reshape([-1, self.num_masks, l]).transpose([0, 2, 1]))
        reg_logits = paddle.concat(reg_list, axis=1)  # [B, A, 4, R+1]
        # expectation over the bins with the fixed projection 0..R (the proj_conv weights)
        proj = self.proj_conv.weight.reshape([self.reg_max + 1, 1])
        distances = paddle.matmul(F.softmax(reg_logits, axis=-1), proj).squeeze(-1)
        return TrainOutputs(paddle.concat(cls_list, axis=1), reg_logits, distances,
                            paddle.concat(ins_list, axis=1), protos, anchor_points, stride_tensor)

    def forward(self, feats: Sequence[paddle.Tensor]):
        feats, protos, anchor_points, stride_tensor = self._protos_and_anchors(feats)
        cls_list, reg_list, ins_list = [], [], []
        for i, feat in enumerate(feats):
            b, _, h, w = feat.shape
            l = h * w
            cls_logit, reg, coef = self._level_logits(i, feat)
            # [B, 4*(R+1), H, W] -> [B, R+1, L, 4]; softmax over bins; project to the expectation
            reg = reg.reshape([-1, 4, self.reg_max + 1, l]).transpose([0, 2, 3, 1])
            reg = self.proj_conv(F.softmax(reg, axis=1)).squeeze(1)  # [B, L, 4]
            cls_list.append(F.sigmoid(cls_logit).reshape([-1, self.num_classes, l]))
            reg_list.append(reg)
            ins_list.append(coef.reshape([-1, self.num_masks, l]))
        scores = paddle.concat(cls_list, axis=-1)
        dist = paddle.concat(reg_list, axis=1)
        coefs = paddle.concat(ins_list, axis=-1)
        return scores, dist, coefs, protos, anchor_points, stride_tensor

    # ---------------------------------------------------------------- post-process
    def post_process(self, head_outs, im_shape: paddle.Tensor, scale_factor: paddle.Tensor,
                     input_hw: tuple[int, int]) -> dict[str, paddle.Tensor]:
        """Boxes in original pixels (not clipped), multiclass NMS, per-detection full-image masks.

        Batch size 1 (as in the exported model). ``input_hw`` is the (padded) network input size.
        """
        scores, dist, coefs, protos, anchor_points, stride_tensor = head_outs
        if scores.shape[0] != 1:
            raise NotImplementedError("post-process supports batch size 1")
        # ltrb distances -> x1y1x2y2 in input pixels
        lt, rb = paddle.split(dist, 2, axis=-1)
        boxes = paddle.concat([anchor_points - lt, anchor_points + rb], axis=-1) * stride_tensor
        out, index, rois_num = _nms_multiclass(
            boxes, scores, self.score_threshold, self.nms_top_k, self.keep_top_k,
            self.nms_threshold)

        sf = scale_factor.astype("float32")
        sy, sx = float(sf[0, 0]), float(sf[0, 1])
        ih, iw = int(input_hw[0]), int(input_hw[1])
        # original size: float32 division then int() truncation, as the reference
        ori = (im_shape.astype("float32") / sf)[0]
        oh, ow = int(float(ori[0])), int(float(ori[1]))
        rh, rw = int(round(ih / sy)), int(round(iw / sx))

        n = int(out.shape[0]) if out.ndim == 2 else 0
        if n == 0:
            return {"bbox": paddle.zeros([1, 6], dtype="float32"),
                    "bbox_num": paddle.to_tensor([0], dtype="int32"),
                    "mask": paddle.zeros([1, oh, ow], dtype="float32")}

        idx = index.reshape([-1]).astype("int64")
        coef = paddle.gather(coefs[0].transpose([1, 0]), idx)  # [N, M]
        m, ph, pw = protos.shape[1], protos.shape[2], protos.shape[3]
        masks = F.sigmoid(paddle.matmul(coef, protos[0].reshape([m, -1]))).reshape([n, ph, pw])
        masks = F.interpolate(masks.unsqueeze(0), size=[ih, iw], mode="bilinear",
                              align_corners=False)[0]
        masks = _crop_mask(masks, out[:, 2:6])
        masks = F.interpolate(masks.unsqueeze(0), size=[rh, rw], mode="bilinear",
                              align_corners=False)[0]
        masks = masks[:, :oh, :ow]
        masks = (masks > self.mask_threshold).astype("float32")

        scale = paddle.to_tensor([sx, sy, sx, sy], dtype="float32")
        bbox = paddle.concat([out[:, :2], out[:, 2:6] / scale], axis=-1)
        return {"bbox": bbox, "bbox_num": rois_num.astype("int32").reshape([-1]), "mask": masks}


    def post_process_batch(self, head_outs, im_shape: paddle.Tensor, scale_factor: paddle.Tensor,
                           input_hw: tuple[int, int], score_floor: float | None = None,
                           keep_above: paddle.Tensor | None = None) -> dict[str, paddle.Tensor]:
        """Graph-friendly (``paddle.jit.save``-able) post-process of a batch of B images.

        Same maths as :meth:`post_process` (sigmoid prototypes -> bilinear to the input size ->
        crop to the box -> bilinear to ``round(input / scale)`` -> first ``floor(im_shape /
        scale)`` pixels -> ``> mask_threshold``), but every step after the prototypes is linear
        and separable, so each detection's mask is ``Ly @ P @ Lx^T``: ``P`` its [ph, pw]
        prototype mix, ``Ly`` [H, ph] / ``Lx`` [W, pw] the two bilinear resizes with the box crop
        folded in between. No [N, ih, iw] input-size masks, no [N, H, W, 2] sampling grid; the one
        large tensor is the [N, H, W] product, and N counts detections after NMS above
        ``max(score_threshold, score_floor)`` only. Masks are uint8 0/1 on a [sum N, Hmax, Wmax]
        canvas of the batch's largest original size, 0 outside each image. Equal to
        :meth:`post_process` up to float32 summation order (a mask pixel within ~1e-6 of the
        threshold can flip). With no detection in the whole batch the output is one row
        ``[-1, 0, 0, 0, 0, 0]`` for image 0 (``bbox_num`` ``[1, 0, ...]``) with an empty mask,
        never a 0-size tensor (which oneDNN cannot run). ``keep_above`` ([1], a graph input): also drop
        the detections scoring at or below it (the caller's threshold) after NMS, before any mask.
        """
        scores, dist, coefs, protos, anchor_points, stride_tensor = head_outs
        lt, rb = paddle.split(dist, 2, axis=-1)
        boxes = paddle.concat([anchor_points - lt, anchor_points + rb], axis=-1) * stride_tensor
        threshold = max(self.score_threshold, float(score_floor or 0.0))
        out, index, rois_num = _nms_multiclass(
            boxes, scores, threshold, self.nms_top_k, self.keep_top_k, self.nms_threshold)
        ih, iw = int(input_hw[0]), int(input_hw[1])
        num_anchors = int(anchor_points.shape[0])
        m, ph, pw = int(protos.shape[1]), int(protos.shape[2]), int(protos.shape[3])
        if keep_above is not None:
            # rows stay in NMS order (image by image), so each image's count is its kept rows
            kept = paddle.nonzero(out[:, 1] > keep_above).reshape([-1])
            out, index = paddle.gather(out, kept), paddle.gather(index, kept)
            row_img = paddle.floor_divide(index.reshape([-1]).astype("int64"),
                                          paddle.full([1], num_anchors, dtype="int64"))
            images = paddle.arange(paddle.shape(scores)[0], dtype="int64")
            rois_num = (row_img.unsqueeze(1) == images.unsqueeze(0)).astype("int32").sum(axis=0)

        # One extra row (class -1, score 0, image 0, empty box) so that no tensor below is ever
        # empty: oneDNN kernels (reshape, elementwise) fail on 0-size tensors when nothing is
        # detected. It is output only when there is no detection at all (as image 0's row, the
        # reference's "no detection" row), and PaddleX and the predictor drop class -1 rows.
        n_det = paddle.shape(out)[0:1]  # [1]
        out = paddle.concat([out, paddle.concat([paddle.full([1, 1], -1.0, dtype=out.dtype),
                                                 paddle.zeros([1, 5], dtype=out.dtype)], axis=1)], axis=0)
        index = paddle.concat([index, paddle.zeros([1, 1], dtype=index.dtype)], axis=0)
        idx = index.reshape([-1]).astype("int64")  # into the flattened [B*A]
        img = paddle.floor_divide(idx, paddle.full([1], num_anchors, dtype="int64"))  # [N]
        coef = paddle.gather(coefs.transpose([0, 2, 1]).reshape([-1, m]), idx)  # [N, M]
        logits = paddle.matmul(coef.unsqueeze(0), protos.reshape([0, m, ph * pw]))  # [B, N, P]
        batch_ids = paddle.arange(paddle.shape(scores)[0], dtype="int64")
        onehot = (img.unsqueeze(1) == batch_ids.unsqueeze(0)).astype(logits.dtype)  # [N, B]
        logits = (logits.transpose([1, 0, 2]) * onehot.unsqueeze(-1)).sum(axis=1)  # [N, P]
        probs = F.sigmoid(logits).reshape([-1, ph, pw])  # [N, ph, pw]

        sf = scale_factor.astype("float32")
        ori = paddle.floor(im_shape.astype("float32") / sf)  # [B, 2] (h0, w0), truncated
        hmax = paddle.cast(paddle.max(ori[:, 0]), "int64")
        wmax = paddle.cast(paddle.max(ori[:, 1]), "int64")
        box = out[:, 2:6]  # input pixels
        ly = _crop_resize_weights(ih, ph, paddle.round(ih / sf[:, 0]), ori[:, 0], hmax, img, box[:, 1:2], box[:, 3:4])
        lx = _crop_resize_weights(iw, pw, paddle.round(iw / sf[:, 1]), ori[:, 1], wmax, img, box[:, 0:1], box[:, 2:3])
        # [N, H, W]: the one large tensor (rows/columns past each image's own size are 0 already)
        masks = paddle.matmul(paddle.matmul(ly, probs), lx, transpose_y=True) > self.mask_threshold

        scale = paddle.gather(paddle.stack([sf[:, 1], sf[:, 0], sf[:, 1], sf[:, 0]], axis=1), img)
        bbox = paddle.concat([out[:, :2], box / scale], axis=-1)
        # drop the extra row unless nothing was detected (then it is image 0's only row)
        none = (n_det == 0).astype("int32")  # [1]
        keep = n_det.astype("int32") + none
        bbox_num = rois_num.astype("int32").reshape([-1])
        first = (paddle.cumsum(paddle.ones_like(bbox_num), axis=0) == 1).astype("int32")
        return {"bbox": bbox[:keep], "bbox_num": bbox_num + first * none,
                "mask": masks[:keep].astype("uint8")}


def _crop_resize_weights(in_size: int, proto_size: int, resized: paddle.Tensor, length: paddle.Tensor,
                         out_size: paddle.Tensor, img: paddle.Tensor, lo_edge: paddle.Tensor,
                         hi_edge: paddle.Tensor) -> paddle.Tensor:
    """One axis of the PP-YOLOE mask resize chain as per-detection matrices ``[N, out_size, proto_size]``.

    Prototype axis (``proto_size``) -> bilinear to the input axis (``in_size``) -> zero outside
    ``[lo_edge, hi_edge)`` (input pixel indices, the box crop) -> bilinear to each image's
    ``resized`` length (``[B]``), of which the first ``length`` samples (``[B]``, the image's own
    size) are kept and the rest, up to the batch's ``out_size``, zeroed. The second resize has two
    taps per output sample; they pick rows of the (static) first-resize matrix, so only
    ``[N, out_size, proto_size]`` tensors are built. ``img`` [N] is each detection's image.
    """
    first = bilinear_matrix((paddle.arange(in_size, dtype="float32") + 0.5) * (proto_size / in_size) - 0.5,
                            proto_size)  # [in, proto], the same for every image (static)
    pos = paddle.arange(out_size, dtype="float32") + 0.5  # [S]
    src = pos.unsqueeze(0) * (float(in_size) / resized.unsqueeze(1)) - 0.5  # [B, S]
    lo, hi, w_lo, w_hi = bilinear_taps(src, in_size)
    inside = (pos.unsqueeze(0) < length.unsqueeze(1)).astype("float32")  # [B, S]: pos - 0.5 < length
    lo, hi = paddle.gather(lo, img), paddle.gather(hi, img)  # [N, S]
    w_lo, w_hi = paddle.gather(w_lo * inside, img), paddle.gather(w_hi * inside, img)

    def tap(index, weight):
        kept = weight * ((index.astype("float32") >= lo_edge) & (index.astype("float32") < hi_edge)).astype("float32")
        rows = paddle.gather(first, index.reshape([-1])).reshape([paddle.shape(index)[0], -1, proto_size])
        return rows * kept.unsqueeze(-1)

    return tap(lo, w_lo) + tap(hi, w_hi)


def _crop_mask(masks: paddle.Tensor, boxes: paddle.Tensor) -> paddle.Tensor:
    """Zero each mask [N,H,W] outside its box [N,4] (x1,y1,x2,y2, pixel-index comparison)."""
    _, h, w = masks.shape
    x1, y1, x2, y2 = [b.reshape([-1, 1, 1]) for b in paddle.split(boxes, 4, axis=1)]
    cols = paddle.arange(w, dtype="float32").reshape([1, 1, w])
    rows = paddle.arange(h, dtype="float32").reshape([1, h, 1])
    keep = ((cols >= x1) & (cols < x2)) & ((rows >= y1) & (rows < y2))  # one full-size op
    return masks * keep.astype(masks.dtype)


def ppyoloe_ins_head_s(num_classes: int = 80, **kw) -> PPYOLOEInsHead:
    """The PP-YOLOE_seg-S head: inputs 384/192/96 (strides 32/16/8), 128 protos, 32 masks."""
    cfg = dict(in_channels=(384, 192, 96), num_classes=num_classes, act="swish",
               fpn_strides=(32, 16, 8), reg_max=16, num_masks=32, num_protos=128)
    cfg.update(kw)
    return PPYOLOEInsHead(**cfg)
