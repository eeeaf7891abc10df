"""RoI heads of Mask R-CNN (He et al. 2017) and Cascade Mask R-CNN (Cai & Vasconcelos 2018).

Pipeline after the RPN:

1. :class:`RoIAlign` pools a fixed-size feature for each proposal; with an FPN each proposal is
   first assigned to one of P2..P5 by its size (``distribute_fpn_proposals``).
2. A box head (:class:`TwoFCHead` on FPN features, or :class:`~..backbones.resnet.Res5Head` on
   res4 for the C4 model) turns it into a vector; :class:`BBoxHead` / :class:`CascadeHead`
   predict class scores (background is the last class) and box deltas.
3. :class:`BBoxPostProcess` decodes the deltas (:func:`delta2bbox`), clips to the input image
   and runs per-class NMS; :meth:`BBoxPostProcess.rescale` maps the kept boxes back to the
   original image.
4. :class:`MaskHead` pools features again on the *final* boxes, predicts an M x M mask per class
   and keeps the detected class; :func:`paste_masks` resamples them onto the original image.

Training uses the same layers on sampled RoIs: :meth:`BBoxHead.head_outputs` (raw logits),
:meth:`CascadeHead.stage_outputs` / :meth:`CascadeHead.refine`, :meth:`MaskHead.forward_train`;
targets and losses are in :mod:`..losses.rcnn_targets` / :mod:`..losses.rcnn_loss`. The
initialisers are PaddleDetection's except the mask logits' (see :class:`MaskHead`); they only
matter for layers that start untrained.

State-dict keys follow PaddleDetection (``bbox_head.head.fc6``, ``bbox_head.bbox_score``,
``bbox_head.bbox_delta_stage2``, ``mask_head.head.upsample.conv5_mask``, ...).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.nn.initializer import KaimingNormal, Normal, XavierUniform
from paddle.vision.ops import distribute_fpn_proposals, roi_align

from instseg_core.modeling.resize import bilinear_matrix

__all__ = ["RoIAlign", "TwoFCHead", "CascadeTwoFCHead", "BBoxHead", "CascadeHead", "BBoxPostProcess",
           "MaskFeat", "MaskHead", "delta2bbox", "clip_boxes", "multiclass_nms", "paste_masks"]

# largest log-scale change of a box side in one decode (a factor of 1000/16), avoids exp overflow
BBOX_CLIP = math.log(1000.0 / 16)


def _normal(std: float) -> paddle.ParamAttr:
    return paddle.ParamAttr(initializer=Normal(0.0, std))


class RoIAlign(nn.Layer):
    """RoIAlign over one feature map, or over FPN levels with per-RoI level assignment.

    With several levels, a box of size ``s = sqrt(w*h)`` goes to level
    ``floor(canonical_level + log2(s / canonical_size))`` clamped to the levels used
    (P2..P5 by default: ``start_level`` 0 .. ``end_level`` 3 of the given list; P6 is not pooled).
    ``aligned=True`` shifts the sampling grid by half a pixel (the configs' setting; PaddleDetection
    ``develop`` hard-codes False, see the oracle README). ``sampling_ratio`` <= 0 is adaptive.
    """

    def __init__(self, resolution: int = 14, spatial_scales: Sequence[float] = (1.0 / 16,),
                 sampling_ratio: int = 0, aligned: bool = True, canonical_level: int = 4,
                 canonical_size: int = 224, start_level: int = 0, end_level: int = 3):
        super().__init__()
        self.resolution = int(resolution)
        self.spatial_scales = [float(s) for s in spatial_scales]
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_level = canonical_level
        self.canonical_size = canonical_size
        self.start_level = start_level
        self.end_level = end_level

    def forward(self, feats: Sequence[paddle.Tensor], rois: list[paddle.Tensor],
                rois_num: paddle.Tensor) -> paddle.Tensor:
        boxes = paddle.concat(rois) if len(rois) > 1 else rois[0]
        if len(feats) == 1:
            return roi_align(feats[self.start_level], boxes, rois_num, self.resolution,
                             spatial_scale=self.spatial_scales[0], sampling_ratio=self.sampling_ratio,
                             aligned=self.aligned)
        level_rois, restore_index, level_nums = distribute_fpn_proposals(
            boxes, self.start_level + 2, self.end_level + 2, self.canonical_level, self.canonical_size,
            rois_num=rois_num)
        pooled = [roi_align(feats[lvl], level_rois[i], level_nums[i], self.resolution,
                            spatial_scale=self.spatial_scales[lvl], sampling_ratio=self.sampling_ratio,
                            aligned=self.aligned)
                  for i, lvl in enumerate(range(self.start_level, self.end_level + 1))]
        # back to the order of the input boxes
        return paddle.gather(paddle.concat(pooled), restore_index.flatten())


class TwoFCHead(nn.Layer):
    """Flatten the 7x7 RoI feature, then fc6 + ReLU, fc7 + ReLU (keys ``fc6``, ``fc7``; Linear is [in, out])."""

    def __init__(self, in_channel: int = 256, out_channel: int = 1024, resolution: int = 7):
        super().__init__()
        fan = in_channel * resolution * resolution
        self.fc6 = nn.Linear(fan, out_channel, weight_attr=paddle.ParamAttr(initializer=XavierUniform(fan_out=fan)))
        self.fc7 = nn.Linear(out_channel, out_channel, weight_attr=paddle.ParamAttr(initializer=XavierUniform()))
        self.out_channels = out_channel

    def forward(self, rois_feat: paddle.Tensor) -> paddle.Tensor:
        x = F.relu(self.fc6(paddle.flatten(rois_feat, start_axis=1)))
        return F.relu(self.fc7(x))


class CascadeTwoFCHead(nn.Layer):
    """One :class:`TwoFCHead` per cascade stage (keys ``0.fc6``, ``1.fc6``, ...)."""

    def __init__(self, in_channel: int = 256, out_channel: int = 1024, resolution: int = 7,
                 num_stages: int = 3):
        super().__init__()
        self.stage_heads = [self.add_sublayer(str(i), TwoFCHead(in_channel, out_channel, resolution))
                            for i in range(num_stages)]
        self.out_channels = out_channel

    def forward(self, rois_feat: paddle.Tensor, stage: int = 0) -> paddle.Tensor:
        return self.stage_heads[stage](rois_feat)


def delta2bbox(deltas: paddle.Tensor, boxes: paddle.Tensor, weights: Sequence[float]) -> paddle.Tensor:
    """Decode ``deltas`` [R, 4K] (dx, dy, dw, dh per class, scaled by ``weights``) relative to
    ``boxes`` [R, 4] (x1, y1, x2, y2) into boxes [R, K, 4]."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = paddle.clip(deltas[:, 2::4] / ww, max=BBOX_CLIP)
    dh = paddle.clip(deltas[:, 3::4] / wh, max=BBOX_CLIP)
    pred_ctr_x = dx * widths.unsqueeze(1) + ctr_x.unsqueeze(1)
    pred_ctr_y = dy * heights.unsqueeze(1) + ctr_y.unsqueeze(1)
    pred_w = paddle.exp(dw) * widths.unsqueeze(1)
    pred_h = paddle.exp(dh) * heights.unsqueeze(1)
    return paddle.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                         pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], axis=-1)


def clip_boxes(boxes: paddle.Tensor, height, width) -> paddle.Tensor:
    """Clip the last-axis (x1, y1, x2, y2) of ``boxes`` to [0, width] x [0, height]
    (``height`` / ``width``: scalars or tensors broadcastable to ``boxes[..., 0]``)."""
    zero = paddle.zeros_like(boxes[..., 0])
    x1 = paddle.maximum(paddle.minimum(boxes[..., 0], width), zero)
    y1 = paddle.maximum(paddle.minimum(boxes[..., 1], height), zero)
    x2 = paddle.maximum(paddle.minimum(boxes[..., 2], width), zero)
    y2 = paddle.maximum(paddle.minimum(boxes[..., 3], height), zero)
    return paddle.stack([x1, y1, x2, y2], axis=-1)


class BBoxHead(nn.Layer):
    """Box classification and class-specific regression on pooled RoI features.

    ``forward(feats, rois, rois_num)`` -> ``(deltas [R, 4C], probs [R, C+1])``; the softmax puts
    the background at index C. With ``with_pool`` (C4 Res5Head) the 7x7 map is average-pooled to
    a vector first. ``bbox_weight``: the delta scaling used to decode.
    """

    def __init__(self, head: nn.Layer, roi_extractor: RoIAlign, in_channel: int = 1024,
                 num_classes: int = 80, bbox_weight: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 with_pool: bool = False):
        super().__init__()
        self.head = head
        self.roi_extractor = roi_extractor
        self.num_classes = num_classes
        self.bbox_weight = list(bbox_weight)
        self.with_pool = with_pool
        self.bbox_score = nn.Linear(in_channel, num_classes + 1, weight_attr=_normal(0.01))
        self.bbox_delta = nn.Linear(in_channel, 4 * num_classes, weight_attr=_normal(0.001))

    def forward(self, feats: Sequence[paddle.Tensor], rois: list[paddle.Tensor],
                rois_num: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        _, logits, deltas = self.head_outputs(feats, rois, rois_num)
        return deltas, F.softmax(logits)

    def head_outputs(self, feats: Sequence[paddle.Tensor], rois: list[paddle.Tensor], rois_num: paddle.Tensor
                     ) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """``(head features, class logits [R, C+1], deltas [R, 4C])``; the head features are the
        Res5Head's 7x7 maps for C4 (its mask head reuses them in training)."""
        head_feat = self.head(self.roi_extractor(feats, rois, rois_num))
        feat = head_feat
        if self.with_pool:
            feat = F.adaptive_avg_pool2d(feat, output_size=1).flatten(start_axis=1)
        return head_feat, self.bbox_score(feat), self.bbox_delta(feat)


class CascadeHead(nn.Layer):
    """Three box heads in sequence, each refining the boxes of the previous one with
    class-agnostic deltas and a stricter IoU training target (hence its own ``bbox_weight``).

    ``forward(feats, rois, rois_num, im_shape)`` -> ``(deltas [R, 4], probs [R, C+1], rois)``:
    the last stage's deltas, the mean of the three stages' softmax scores (each computed on its
    own stage's boxes), and the RoIs the last stage saw (the boxes to decode the deltas against).
    """

    def __init__(self, head: CascadeTwoFCHead, roi_extractor: RoIAlign, in_channel: int = 1024,
                 num_classes: int = 80,
                 bbox_weight: Sequence[Sequence[float]] = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                                                           (30.0, 30.0, 15.0, 15.0))):
        super().__init__()
        self.head = head
        self.roi_extractor = roi_extractor
        self.num_classes = num_classes
        self.bbox_weight = [list(w) for w in bbox_weight]
        self.num_stages = len(self.bbox_weight)
        self.bbox_score_list: list[nn.Linear] = []
        self.bbox_delta_list: list[nn.Linear] = []
        for i in range(self.num_stages):
            self.bbox_score_list.append(self.add_sublayer(
                f"bbox_score_stage{i}", nn.Linear(in_channel, num_classes + 1, weight_attr=_normal(0.01))))
            self.bbox_delta_list.append(self.add_sublayer(
                f"bbox_delta_stage{i}", nn.Linear(in_channel, 4, weight_attr=_normal(0.001))))

    def forward(self, feats: Sequence[paddle.Tensor], rois: list[paddle.Tensor], rois_num: paddle.Tensor,
                im_shape: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, list[paddle.Tensor]]:
        probs_sum = None
        deltas = None
        for stage in range(self.num_stages):
            if stage > 0:
                # the previous stage's decoded boxes, clipped to the image, become this stage's RoIs
                rois = self.refine(deltas, rois, rois_num, im_shape, stage - 1)
            logits, deltas = self.stage_outputs(feats, rois, rois_num, stage)
            probs = F.softmax(logits)
            probs_sum = probs if probs_sum is None else probs_sum + probs
        return deltas, probs_sum / self.num_stages, rois

    def stage_outputs(self, feats: Sequence[paddle.Tensor], rois: list[paddle.Tensor], rois_num: paddle.Tensor,
                      stage: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Class logits [R, C+1] and class-agnostic deltas [R, 4] of stage ``stage`` on ``rois``."""
        feat = self.head(self.roi_extractor(feats, rois, rois_num), stage)
        return self.bbox_score_list[stage](feat), self.bbox_delta_list[stage](feat)

    def refine(self, deltas: paddle.Tensor, rois: list[paddle.Tensor], rois_num: paddle.Tensor,
               im_shape: paddle.Tensor, stage: int) -> list[paddle.Tensor]:
        """Per image: ``rois`` moved by stage ``stage``'s ``deltas`` and clipped to the image."""
        boxes = delta2bbox(deltas, paddle.concat(rois) if len(rois) > 1 else rois[0],
                           self.bbox_weight[stage]).reshape([-1, 4])
        rois = self._split(boxes, rois_num)
        return [clip_boxes(r, im_shape[i, 0], im_shape[i, 1]) for i, r in enumerate(rois)]

    @staticmethod
    def _split(boxes: paddle.Tensor, rois_num: paddle.Tensor) -> list[paddle.Tensor]:
        if int(rois_num.shape[0]) == 1:
            return [boxes]
        return list(paddle.split(boxes, [int(n) for n in rois_num.numpy()]))


def multiclass_nms(bboxes: paddle.Tensor, scores: paddle.Tensor, rois_num: paddle.Tensor,
                   score_threshold: float = 0.05, nms_threshold: float = 0.5, keep_top_k: int = 100,
                   nms_top_k: int = -1, background_label: int = -1) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Per-class NMS of class-specific boxes ``bboxes`` [R, C, 4] with ``scores`` [R, C]
    (``rois_num`` [B] RoIs per image) -> ``(out [N, 6] = [class, score, x1, y1, x2, y2], num [B])``.

    Paddle's ``multiclass_nms3`` kernel (the one the reference uses; it exports as a graph op).
    Rows come grouped by class id, by score within a class, at most ``keep_top_k`` per image
    (the best by score across classes)."""
    out, _, num = paddle._C_ops.multiclass_nms3(bboxes, scores, rois_num, score_threshold, nms_top_k,
                                                keep_top_k, nms_threshold, True, 1.0, background_label)
    return out, num


class BBoxPostProcess(nn.Layer):
    """Decode + clip + multi-class NMS (in input-image pixels), and the rescale to the original image.

    ``prior_box_var``: the delta scaling of the deltas being decoded (the last cascade stage uses
    [30, 30, 15, 15]). No parameters.
    """

    def __init__(self, num_classes: int = 80, prior_box_var: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 score_threshold: float = 0.05, nms_threshold: float = 0.5, keep_top_k: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.prior_box_var = list(prior_box_var)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.keep_top_k = keep_top_k

    def forward(self, deltas: paddle.Tensor, probs: paddle.Tensor, rois: list[paddle.Tensor],
                rois_num: paddle.Tensor, im_shape: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        boxes = delta2bbox(deltas, paddle.concat(rois) if len(rois) > 1 else rois[0], self.prior_box_var)
        # one box per class: class-agnostic deltas (cascade) give the same box for every class
        boxes = paddle.expand(boxes, [paddle.shape(boxes)[0], self.num_classes, 4])
        # clip each image's boxes to its own (resized, unpadded) size
        if len(rois) == 1:
            boxes = clip_boxes(boxes, im_shape[0, 0], im_shape[0, 1])
        else:
            chunks = paddle.split(boxes, [int(r.shape[0]) for r in rois])
            boxes = paddle.concat([clip_boxes(b, im_shape[i, 0], im_shape[i, 1]) for i, b in enumerate(chunks)])
        scores = probs[:, :-1]  # drop the background column
        return multiclass_nms(boxes, scores, rois_num, self.score_threshold, self.nms_threshold,
                              self.keep_top_k, background_label=self.num_classes)

    @staticmethod
    def rescale(bbox: paddle.Tensor, im_shape: paddle.Tensor, scale_factor: paddle.Tensor
                ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Boxes of one image from input to original pixels, clipped to the original size
        ``floor(im_shape / scale_factor + 0.5)``; rows whose box became empty get label -1.
        Returns ``(bbox [N, 6], origin_shape [2] float32 (h, w))``."""
        origin_shape = paddle.floor(im_shape / scale_factor + 0.5)
        scale_y, scale_x = scale_factor[0:1], scale_factor[1:2]
        scale = paddle.concat([scale_x, scale_y, scale_x, scale_y])
        boxes = clip_boxes(bbox[:, 2:] / scale, origin_shape[0], origin_shape[1])
        keep = paddle.logical_and(boxes[:, 2] - boxes[:, 0] > 0, boxes[:, 3] - boxes[:, 1] > 0).unsqueeze(1)
        label = paddle.where(keep, bbox[:, 0:1], paddle.full_like(bbox[:, 0:1], -1.0))
        return paddle.concat([label, bbox[:, 1:2], boxes], axis=1), origin_shape


class MaskFeat(nn.Layer):
    """``num_convs`` x (3x3 conv + ReLU), then a 2x2 stride-2 transposed conv + ReLU that doubles
    the resolution (14 -> 28 on FPN features; 7 -> 14 after the C4 Res5Head). Key ``upsample.*``."""

    def __init__(self, in_channel: int = 256, out_channel: int = 256, num_convs: int = 4):
        super().__init__()
        self.upsample = nn.Sequential()
        conv_init = paddle.ParamAttr(initializer=KaimingNormal(fan_in=out_channel * 3 * 3))
        for i in range(num_convs):
            name = f"mask_inter_feat_{i + 1}"
            self.upsample.add_sublayer(name, nn.Conv2D(in_channel if i == 0 else out_channel, out_channel,
                                                       kernel_size=3, padding=1, weight_attr=conv_init))
            self.upsample.add_sublayer(name + "act", nn.ReLU())
        self.upsample.add_sublayer("conv5_mask", nn.Conv2DTranspose(
            out_channel if num_convs > 0 else in_channel, out_channel, kernel_size=2, stride=2,
            weight_attr=paddle.ParamAttr(initializer=KaimingNormal(fan_in=out_channel * 2 * 2))))
        self.upsample.add_sublayer("conv5_maskact", nn.ReLU())
        self.out_channels = out_channel

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.upsample(x)


class MaskHead(nn.Layer):
    """Per-class mask logits on RoI features of the final boxes; returns the sigmoid of the
    detected class's map, ``[N, M, M]``.

    ``share_bbox_feat`` (C4): the pooled features go through the box head's feature extractor
    (``feat_func``, the Res5Head) before :class:`MaskFeat`.
    """

    def __init__(self, head: MaskFeat, roi_extractor: RoIAlign, num_classes: int = 80,
                 share_bbox_feat: bool = False):
        super().__init__()
        self.roi_extractor = roi_extractor
        self.head = head
        self.num_classes = num_classes
        self.share_bbox_feat = share_bbox_feat
        # He init over the real fan-in (PaddleDetection passes fan_in=num_classes, which gives weights of
        # std 1 for a 2-class model: logits of tens and a diverging first step without a long warmup)
        self.mask_fcn_logits = nn.Conv2D(head.out_channels, num_classes, kernel_size=1,
                                         weight_attr=paddle.ParamAttr(initializer=KaimingNormal()))

    def forward(self, feats: Sequence[paddle.Tensor], bbox: paddle.Tensor, bbox_num: paddle.Tensor,
                feat_func: Callable[[paddle.Tensor], paddle.Tensor] | None = None) -> paddle.Tensor:
        rois_feat = self.roi_extractor(feats, [bbox[:, 2:]], bbox_num)
        if self.share_bbox_feat:
            rois_feat = feat_func(rois_feat)
        logits = self.mask_fcn_logits(self.head(rois_feat))  # [N, C, M, M]
        if self.num_classes == 1:
            return F.sigmoid(logits[:, 0])
        labels = bbox[:, 0].astype("int64")
        index = paddle.stack([paddle.arange(paddle.shape(labels)[0], dtype="int64"), labels], axis=1)
        return F.sigmoid(paddle.gather_nd(logits, index))

    def forward_train(self, feats: Sequence[paddle.Tensor], rois: list[paddle.Tensor], rois_num: paddle.Tensor,
                      shared_feat: paddle.Tensor | None = None) -> paddle.Tensor:
        """Mask logits [P, C, M, M] of the foreground RoIs ``rois`` (one tensor per image). With
        ``share_bbox_feat`` (C4) ``shared_feat`` holds their box-head features (the Res5Head's
        7x7 maps) and no new RoIAlign runs."""
        if self.share_bbox_feat:
            rois_feat = shared_feat
        else:
            rois_feat = self.roi_extractor(feats, rois, rois_num)
        return self.mask_fcn_logits(self.head(rois_feat))


def paste_masks(masks: paddle.Tensor, boxes: paddle.Tensor, im_h, im_w) -> paddle.Tensor:
    """Resample per-box mask probabilities ``masks`` [N, M, M] into their ``boxes`` [N, 4]
    (original-image pixels) on an ``im_h`` x ``im_w`` canvas: bilinear sampling at pixel centres,
    zero from half a mask cell outside the box on (``grid_sample``, ``align_corners=False``, zero
    padding). Returns probabilities [N, im_h, im_w].

    Computed as ``Ry @ masks @ Rx^T`` with per-box 1-D weights ``Ry`` [N, im_h, M] / ``Rx``
    [N, im_w, M]: the bilinear kernel is separable, so no [N, im_h, im_w, 2] sampling grid is
    built; the one full-size tensor is the result. Equal to ``grid_sample`` up to float32
    summation order (a few 1e-7).
    """
    mh, mw = int(masks.shape[1]), int(masks.shape[2])
    x0, y0, x1, y1 = paddle.split(boxes, 4, axis=1)  # [N, 1] each
    img_y = paddle.arange(0, im_h, dtype="float32") + 0.5
    img_x = paddle.arange(0, im_w, dtype="float32") + 0.5
    # pixel centres in mask cells: grid_sample's [-1, 1] box frame, unnormalised with its formula
    gy = (img_y - y0) / (y1 - y0) * 2 - 1  # [N, H]
    gx = (img_x - x0) / (x1 - x0) * 2 - 1  # [N, W]
    ry = bilinear_matrix((gy + 1) * mh * 0.5 - 0.5, mh, clamp=False)  # [N, H, M]
    rx = bilinear_matrix((gx + 1) * mw * 0.5 - 0.5, mw, clamp=False)  # [N, W, M]
    return paddle.matmul(paddle.matmul(ry, masks), rx, transpose_y=True)
