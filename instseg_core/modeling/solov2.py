"""SOLOv2 (solov2_r50_fpn_1x): ResNet50-b + FPN, SOLOv2 heads and the matrix-NMS post-process.

Written from the reference notes (``shared/reference/ppdet_models.md`` section 2.3) and checked
against the oracle outputs. Training (``model.train()``; ``model(inputs, targets)``) builds the
grid targets from the instance masks and returns the dice + focal losses: see
:mod:`.losses.solov2_loss`.

Inference, per image (batch size 1, like the reference):

1. Category scores (sigmoid, point-NMS) of every grid cell of every level, and one dynamic
   1x1-conv kernel per cell.
2. Every (cell, class) with score > ``score_threshold`` is a candidate; its cell's kernel applied
   to the mask feature gives its mask probabilities; the mask is ``prob > mask_threshold``.
3. Masks whose area is not above their level's stride are dropped; each score is multiplied by
   the mean probability inside the mask ("maskness").
4. Matrix NMS (Gaussian, sigma 2) decays the scores of overlapping same-class masks; scores below
   ``update_threshold`` go; the top ``post_nms_top_n`` remain.
5. The mask probabilities are upsampled x4 (to the input size), cropped to ``im_shape``, resized to
   the original image size and thresholded to uint8.

Reference quirks kept on purpose:

* A padding candidate -- label 0, score 0, the mask of an all-ones kernel -- rides along through
  every step so no tensor is ever empty. Matrix NMS always keeps its lowest-scored row, so the
  output ends with that padding row unless ``post_nms_top_n`` real instances fill it.
* The original size is ``int(im_shape / scale_factor[0][0] + 0.5)``: the y scale for both axes.
"""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from instseg_core.inference.postprocess import SOLOV2_OUTPUTS
from instseg_core.modeling.backbones.resnet import ResNet
from instseg_core.modeling.base import InstanceSegModel
from instseg_core.modeling.heads.solov2_head import SOLOv2Head, SOLOv2MaskHead
from instseg_core.modeling.losses.solov2_loss import SOLOv2Loss
from instseg_core.modeling.necks.fpn import FPN

__all__ = ["SOLOv2", "mask_matrix_nms", "solov2"]


def _sort_desc(scores: paddle.Tensor, top_n: int) -> paddle.Tensor:
    """Indices of the ``top_n`` highest scores, highest first (all of them when fewer)."""
    return paddle.argsort(scores, descending=True)[:top_n]


def mask_matrix_nms(seg_probs: paddle.Tensor, seg_masks: paddle.Tensor, labels: paddle.Tensor,
                    scores: paddle.Tensor, areas: paddle.Tensor, *, update_threshold: float = 0.05,
                    pre_nms_top_n: int = 500, post_nms_top_n: int = 100,
                    sigma: float = 2.0) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Matrix NMS over masks (SOLOv2 paper, section 3.3.3), Gaussian kernel, in parallel.

    Instead of suppressing sequentially, each mask j's score is multiplied by
    ``min_i f(iou_ij) / f(max_k iou_ki)`` over the higher-scored masks i of its class, with
    ``f(x) = exp(-sigma x^2)``: the decay caused by i, compensated by how much i was itself
    suppressed. ``seg_probs`` [n,H,W] probabilities, ``seg_masks`` [n,H,W] 0./1., ``labels`` [n],
    ``scores`` [n], ``areas`` [n] (mask sums). Returns (probabilities, scores, labels) of the kept
    rows, highest score first. The lowest-scored input row is always kept (it is the padding row).
    """
    order = _sort_desc(scores, pre_nms_top_n)
    seg_masks = paddle.gather(seg_masks, order)
    seg_probs = paddle.gather(seg_probs, order)
    areas = paddle.gather(areas, order)
    scores = paddle.gather(scores, order)
    labels = paddle.gather(labels, order)

    n = paddle.shape(labels)[0]
    flat = paddle.flatten(seg_masks, start_axis=1)
    inter = paddle.mm(flat, flat.transpose([1, 0]))
    area_cols = paddle.expand(areas, [n, n])  # [i, j] -> area of j
    iou = paddle.triu(inter / (area_cols + area_cols.transpose([1, 0]) - inter), diagonal=1)
    label_cols = paddle.expand(labels, [n, n])
    same_class = paddle.triu(paddle.cast(label_cols == label_cols.transpose([1, 0]), "float32"), diagonal=1)
    # decay_iou[i, j]: IoU of j with a higher-scored mask i of its class (0 elsewhere)
    decay_iou = iou * same_class
    # compensation of row i: the largest IoU of mask i with a higher-scored mask of its class
    compensate_iou = paddle.expand(paddle.max(decay_iou, axis=0), [n, n]).transpose([1, 0])
    decay = paddle.exp(-sigma * decay_iou ** 2)
    compensate = paddle.exp(-sigma * compensate_iou ** 2)
    scores = scores * paddle.min(decay / compensate, axis=0)

    keep = paddle.nonzero(scores >= update_threshold).squeeze(1)
    # the last (lowest-scored) row is always kept, so the result is never empty
    keep = paddle.concat([keep, paddle.cast(n - 1, "int64").reshape([1])])
    seg_probs = paddle.gather(seg_probs, keep)
    scores = paddle.gather(scores, keep)
    labels = paddle.gather(labels, keep)

    order = _sort_desc(scores, post_nms_top_n)
    return paddle.gather(seg_probs, order), paddle.gather(scores, order), paddle.gather(labels, order)


class SOLOv2(InstanceSegModel):
    """Eval: ``forward({'image', 'im_shape', 'scale_factor'})`` -> ``{'bbox_num', 'cate_label',
    'cate_score', 'segm'}`` (the reference's output names, sorted: the exported graph's order).

    ``segm`` [N,H0,W0] uint8 0/1 at the original image size, ``cate_label`` [N] int64,
    ``cate_score`` [N] float32 (highest first), ``bbox_num`` [1] int64 = N. Batch size 1.

    Train: ``forward({'image', ...}, targets)`` -> ``{'loss', 'loss_ins', 'loss_cate'}`` (see
    :class:`~.losses.solov2_loss.SOLOv2Loss` and the batch format of ``instseg_core.training.data``);
    any batch size, any input size that is a multiple of 32.
    """

    model_name = "SOLOv2"  # the official name (tells the family: export, evaluation)
    output_keys = SOLOV2_OUTPUTS

    def __init__(self, backbone: nn.Layer, neck: nn.Layer, solov2_head: SOLOv2Head,
                 mask_head: SOLOv2MaskHead, update_threshold: float = 0.05, pre_nms_top_n: int = 500,
                 post_nms_top_n: int = 100, nms_sigma: float = 2.0):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.solov2_head = solov2_head
        self.mask_head = mask_head
        self.update_threshold = update_threshold
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_sigma = nms_sigma
        # a plain object, not a sub-layer: the criterion holds no state and adds no state-dict keys
        self.criterion = SOLOv2Loss(num_classes=solov2_head.num_classes, num_grids=solov2_head.num_grids)

    @property
    def num_classes(self) -> int:
        """The number of classes the category branch scores."""
        return self.solov2_head.num_classes

    def head_outputs(self, image: paddle.Tensor):
        """(category maps, kernel maps, mask feature) of the eval forward; see the heads."""
        feats = self.neck(self.backbone(image))
        mask_feat = self.mask_head(feats)
        cate_maps, kernel_maps = self.solov2_head(feats)
        return cate_maps, kernel_maps, mask_feat

    def losses(self, inputs: dict[str, paddle.Tensor],
               targets: list[dict[str, paddle.Tensor]]) -> dict[str, paddle.Tensor]:
        """Training losses of a batch (see the class docstring)."""
        # in training mode the head returns raw category logits [B, C, S, S]
        cate_logits, kernel_maps, mask_feat = self.head_outputs(inputs["image"])
        return self.criterion(cate_logits, kernel_maps, mask_feat, targets)

    def predict(self, inputs: dict[str, paddle.Tensor]) -> dict[str, paddle.Tensor]:
        """Instances of image 0 (also the exported graph's body)."""
        cate_maps, kernel_maps, mask_feat = self.head_outputs(inputs["image"])
        return self.post_process(cate_maps, kernel_maps, mask_feat, inputs["im_shape"],
                                 inputs["scale_factor"])

    def _candidate_strides(self) -> paddle.Tensor:
        """The level stride of every grid cell (levels in order, cells row-major), plus 0 for the
        padding candidate."""
        head = self.solov2_head
        parts = [paddle.full([s * s], st, dtype="int32") for s, st in zip(head.num_grids, head.segm_strides)]
        return paddle.concat(parts + [paddle.zeros([1], dtype="int32")])

    def post_process(self, cate_maps: Sequence[paddle.Tensor], kernel_maps: Sequence[paddle.Tensor],
                     mask_feat: paddle.Tensor, im_shape: paddle.Tensor,
                     scale_factor: paddle.Tensor) -> dict[str, paddle.Tensor]:
        """Instances of image 0 from the head outputs (see the module docstring)."""
        head = self.solov2_head
        num_classes, kernel_dim = head.num_classes, head.kernel_out_channels
        num_cells = sum(s * s for s in head.num_grids)
        # every cell of every level: scores [M, C] and kernels [M, E]
        cate = paddle.concat([m[0].reshape([-1, num_classes]) for m in cate_maps])
        kernels = paddle.concat([k[0].transpose([1, 2, 0]).reshape([-1, kernel_dim]) for k in kernel_maps])

        # candidates (cell, class) above the score threshold, plus the padding one (cell M, class 0)
        inds = paddle.nonzero(cate > head.score_threshold)
        pad = paddle.concat([paddle.full([1, 1], num_cells, dtype="int64"), paddle.zeros([1, 1], dtype="int64")],
                            axis=1)
        inds = paddle.concat([inds, pad])
        cells, labels = inds[:, 0], inds[:, 1]
        kernels = paddle.gather(paddle.concat([kernels, paddle.ones([1, kernel_dim], dtype="float32")]), cells)
        flat_scores = paddle.concat([cate.reshape([-1]), paddle.zeros([1], dtype="float32")])
        scores = paddle.gather(flat_scores, cells * num_classes + labels)
        strides = paddle.gather(self._candidate_strides(), cells)

        # dynamic 1x1 conv: each candidate's kernel over the mask feature
        probs = F.sigmoid(F.conv2d(mask_feat[:1], kernels.unsqueeze([2, 3])).squeeze(0))  # [K, H, W]
        masks = paddle.cast(probs > head.mask_threshold, "float32")
        areas = paddle.sum(masks, axis=[1, 2])

        # drop masks no larger than their level's stride; the padding row is always (re-)appended
        keep = paddle.nonzero(areas > paddle.cast(strides, "float32")).squeeze(1)
        last = paddle.cast(paddle.shape(areas)[0:1] - 1, "int64")
        rows = paddle.concat([keep, last])
        scores = paddle.concat([paddle.gather(scores, keep), paddle.zeros([1], dtype="float32")])
        masks = paddle.gather(masks, rows)
        probs = paddle.gather(probs, rows)
        areas = paddle.gather(areas, rows)
        labels = paddle.gather(labels, rows)

        # maskness: mean probability inside the mask
        scores = scores * (paddle.sum(probs * masks, axis=[1, 2]) / areas)
        probs, scores, labels = mask_matrix_nms(
            probs, masks, labels, scores, areas, update_threshold=self.update_threshold,
            pre_nms_top_n=self.pre_nms_top_n, post_nms_top_n=self.post_nms_top_n, sigma=self.nms_sigma)

        # back to the input resolution, crop the padding, resize to the original image size
        # (the reference uses the y scale for both axes)
        shape = im_shape[0]
        h, w = paddle.cast(shape[0], "int32"), paddle.cast(shape[1], "int32")
        ori_hw = paddle.cast(shape / scale_factor[0, 0] + 0.5, "int32")
        up = F.interpolate(probs.unsqueeze(0), size=paddle.shape(mask_feat)[2:] * 4, mode="bilinear",
                           align_corners=False, align_mode=0)
        up = paddle.slice(up, axes=[2, 3], starts=[0, 0], ends=[h, w])
        up = F.interpolate(up, size=ori_hw, mode="bilinear", align_corners=False, align_mode=0).squeeze(0)
        segm = paddle.cast(up > head.mask_threshold, "uint8")
        return {
            "bbox_num": paddle.cast(paddle.shape(labels)[0:1], "int64"),
            "cate_label": labels,
            "cate_score": scores,
            "segm": segm,
        }


def solov2(num_classes: int = 80, *, fpn_channels: int = 256, seg_feat_channels: int = 512,
           stacked_convs: int = 4, num_grids: Sequence[int] = (40, 36, 24, 16, 12),
           kernel_out_channels: int = 256, mask_mid_channels: int = 128) -> SOLOv2:
    """SOLOv2 R50-FPN (solov2_r50_fpn_1x): ResNet50-b (res2..res5) + 5-level FPN + SOLOv2 heads.

    The keyword arguments give slimmer variants (tests, experiments); the defaults are the official
    architecture, the only one its weights fit. The mask feature has ``kernel_out_channels``
    channels (each dynamic kernel is a 1x1 conv over it); GroupNorm(32) needs every width except
    ``fpn_channels`` to be a multiple of 32.
    """
    backbone = ResNet(depth=50, variant="b", return_idx=(0, 1, 2, 3))
    neck = FPN(in_channels=backbone.out_channels, out_channel=fpn_channels, extra_stage=1)
    head = SOLOv2Head(num_classes=num_classes, in_channels=fpn_channels, seg_feat_channels=seg_feat_channels,
                      stacked_convs=stacked_convs, num_grids=num_grids, kernel_out_channels=kernel_out_channels)
    mask_head = SOLOv2MaskHead(in_channels=fpn_channels, mid_channels=mask_mid_channels,
                               out_channels=kernel_out_channels, start_level=0, end_level=3)
    backbone.freeze_stages(0)  # training as solov2_r50_fpn.yml: stem + res2 frozen (freeze_at 0)
    return SOLOv2(backbone, neck, head, mask_head)
