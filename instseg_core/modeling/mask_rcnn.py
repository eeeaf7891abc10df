"""Mask R-CNN and Cascade Mask R-CNN (PaddleDetection's 8 R-CNN instance-segmentation models).

``mask_rcnn(name)`` builds one of :data:`MASK_RCNN_CONFIGS` by its PaddleX name. The network is
the paper's pipeline, one layer per stage:

* ``backbone``: ResNet / ResNeXt (:mod:`.backbones.resnet`), res2..res5, or res4 only for the
  C4 model ``MaskRCNN-ResNet50``;
* ``neck``: FPN, P2..P6 (absent in C4);
* ``rpn_head``: anchors + objectness + proposal generation (:mod:`.heads.rpn`);
* ``bbox_head``: RoIAlign + box head, one stage or a 3-stage cascade (:mod:`.heads.roi_heads`);
* ``bbox_post_process``: decode, clip, per-class NMS (no parameters);
* ``mask_head``: RoIAlign on the detected boxes + mask FCN; the masks are pasted onto the
  original image.

Eval ``forward({'image', 'im_shape', 'scale_factor'})`` -> ``{'bbox' [N, 6] float32 = [class,
score, x1, y1, x2, y2] in original-image pixels, 'bbox_num' [B] int32, 'mask' [N, H0, W0] uint8
0/1}``, with H0, W0 = ``floor(im_shape / scale_factor + 0.5)``. An image without detections gets
one placeholder row ``[0, 0, 0, 0, 1/sx, 1/sy]`` with an empty mask, as in the reference.

Train ``forward(inputs, targets)`` (``model.train()``; the batch format of
``instseg_core.training.data``) -> ``{'loss', 'loss_rpn_cls', 'loss_rpn_reg', 'loss_bbox_cls',
'loss_bbox_reg', 'loss_mask'}``; the cascade reports ``loss_bbox_{cls,reg}_stage{0,1,2}``, each
already scaled by its stage weight (1/3). ``loss`` is the plain sum of the terms, as in
PaddleDetection. Targets and settings: :mod:`.losses.rcnn_targets` (:class:`RCNNTrainConfig`);
losses: :mod:`.losses.rcnn_loss`. The stem and res2 are frozen (``freeze_at`` 0) and every
BatchNorm keeps its statistics and affine parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import paddle
import paddle.nn as nn

from instseg_core.modeling.backbones.resnet import Res5Head, ResNet
from instseg_core.modeling.base import InstanceSegModel
from instseg_core.modeling.heads.roi_heads import (BBoxHead, BBoxPostProcess, CascadeHead, CascadeTwoFCHead, MaskFeat,
                                                   MaskHead, RoIAlign, TwoFCHead, paste_masks)
from instseg_core.modeling.heads.rpn import AnchorGenerator, RPNHead
from instseg_core.modeling.losses.rcnn_loss import box_head_loss, flatten_rpn_outputs, mask_loss, rpn_loss
from instseg_core.modeling.losses.rcnn_targets import (RCNNTrainConfig, RoITargets, assign_anchors, mask_targets,
                                                       nonempty_boxes, sample_rois)
from instseg_core.modeling.necks.fpn import FPN

__all__ = ["MaskRCNN", "MaskRCNNConfig", "MASK_RCNN_CONFIGS", "MASK_RCNN_NAMES", "mask_rcnn"]


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Architecture of one named model (the PaddleDetection config's model section)."""

    depth: int = 50
    variant: str = "b"
    groups: int = 1
    base_width: int = 64
    fpn: bool = True
    cascade: bool = False
    # training only: per-stage learning-rate multipliers of res2..res5 (the SSLDv2 config's lr_mult_list)
    backbone_lr_mult: tuple[float, float, float, float] | None = None


MASK_RCNN_CONFIGS: dict[str, MaskRCNNConfig] = {
    "MaskRCNN-ResNet50": MaskRCNNConfig(fpn=False),
    "MaskRCNN-ResNet50-FPN": MaskRCNNConfig(),
    "MaskRCNN-ResNet50-vd-FPN": MaskRCNNConfig(variant="d"),
    "MaskRCNN-ResNet101-FPN": MaskRCNNConfig(depth=101),
    "MaskRCNN-ResNet101-vd-FPN": MaskRCNNConfig(depth=101, variant="d"),
    "MaskRCNN-ResNeXt101-vd-FPN": MaskRCNNConfig(depth=101, variant="d", groups=64, base_width=4),
    "Cascade-MaskRCNN-ResNet50-FPN": MaskRCNNConfig(cascade=True),
    # SSLDv2 only changes the ImageNet initialisation: the network is the R50-vd one
    "Cascade-MaskRCNN-ResNet50-vd-SSLDv2-FPN": MaskRCNNConfig(variant="d", cascade=True,
                                                              backbone_lr_mult=(0.05, 0.05, 0.1, 0.15)),
}
MASK_RCNN_NAMES = tuple(MASK_RCNN_CONFIGS)


class MaskRCNN(InstanceSegModel):
    """Backbone (+ FPN) -> RPN -> box head (single or cascade) -> NMS -> mask head -> paste.

    ``predict(inputs)`` also returns the intermediate results (proposals, per-proposal deltas
    and scores, the boxes before rescaling, the per-box mask probabilities) for checking; the eval
    forward and the exported graph return ``bbox``, ``bbox_num`` and ``mask`` only.
    """

    def __init__(self, backbone: nn.Layer, neck: nn.Layer | None, rpn_head: RPNHead, bbox_head: nn.Layer,
                 mask_head: MaskHead, bbox_post_process: BBoxPostProcess, mask_threshold: float = 0.5,
                 model_name: str | None = None, train_cfg: RCNNTrainConfig | None = None):
        super().__init__()
        self.backbone = backbone
        # (the cascade reference registers its neck after the box head: same keys, listed in its order)
        if not isinstance(bbox_head, CascadeHead):
            self.neck = neck
        self.rpn_head = rpn_head
        self.bbox_head = bbox_head
        if isinstance(bbox_head, CascadeHead):
            self.neck = neck
        self.mask_head = mask_head
        self.bbox_post_process = bbox_post_process
        self.mask_threshold = mask_threshold
        self.model_name = model_name
        self.num_classes = bbox_post_process.num_classes
        self.train_cfg = train_cfg or RCNNTrainConfig()

    def predict(self, inputs: dict[str, paddle.Tensor]) -> dict[str, object]:
        """The final outputs (``bbox``, ``bbox_num``, ``mask``) plus the intermediate results."""
        image, im_shape, scale_factor = inputs["image"], inputs["im_shape"], inputs["scale_factor"]
        body_feats = self.backbone(image)
        feats = self.neck(body_feats) if self.neck is not None else body_feats
        rois, rois_num = self.rpn_head(feats, im_shape)
        if isinstance(self.bbox_head, CascadeHead):
            deltas, probs, final_rois = self.bbox_head(feats, rois, rois_num, im_shape)
        else:
            deltas, probs = self.bbox_head(feats, rois, rois_num)
            final_rois = rois
        # detections in input-image pixels, grouped per image
        bbox, bbox_num = self.bbox_post_process(deltas, probs, final_rois, rois_num, im_shape)
        # masks are predicted on the final boxes; C4 reuses the box head's res5 on the RoI features
        feat_func = self.bbox_head.head if self.mask_head.share_bbox_feat else None
        mask_probs = self.mask_head(feats, bbox, bbox_num, feat_func=feat_func)
        out = self.to_original_images(bbox, bbox_num, mask_probs, im_shape, scale_factor)
        out.update(backbone_feats=body_feats, neck_feats=feats if self.neck is not None else None,
                   rpn_rois=rois, rpn_rois_num=rois_num, bbox_deltas=deltas, bbox_probs=probs,
                   final_rois=final_rois, nms_bbox=bbox, nms_bbox_num=bbox_num, mask_probs=mask_probs)
        return out

    def to_original_images(self, bbox: paddle.Tensor, bbox_num: paddle.Tensor, mask_probs: paddle.Tensor,
                           im_shape: paddle.Tensor, scale_factor: paddle.Tensor) -> dict[str, paddle.Tensor]:
        """Per image: boxes to original pixels, masks pasted at the original size and thresholded."""
        out_bbox, out_mask, out_num = [], [], []
        batch = int(im_shape.shape[0])
        counts = bbox_num.numpy().tolist() if batch > 1 else None
        for i in range(batch):
            if batch == 1:
                rows, probs_i, n = bbox, mask_probs, bbox_num[0:1]
            else:  # dygraph only: the exported graph has batch size 1
                s = int(sum(counts[:i]))
                rows, probs_i, n = bbox[s:s + counts[i]], mask_probs[s:s + counts[i]], bbox_num[i:i + 1]
            rows, probs_i, n = self._placeholder_if_empty(rows, probs_i, n)
            det, origin_shape = self.bbox_post_process.rescale(rows, im_shape[i], scale_factor[i])
            origin_hw = origin_shape.astype("int32")
            pasted = paste_masks(probs_i, det[:, 2:], origin_hw[0], origin_hw[1])
            out_bbox.append(det)
            # uint8: a quarter of int32's memory at full image size; PaddleX reads any integer dtype
            out_mask.append((pasted >= self.mask_threshold).astype("uint8"))
            out_num.append(n)
        if batch == 1:
            mask = out_mask[0]
        else:  # zero-pad every image's masks to the largest original size of the batch
            h = max(int(m.shape[1]) for m in out_mask)
            w = max(int(m.shape[2]) for m in out_mask)
            padded = []
            for m in out_mask:
                canvas = paddle.zeros([int(m.shape[0]), h, w], dtype="uint8")
                canvas[:, :int(m.shape[1]), :int(m.shape[2])] = m
                padded.append(canvas)
            mask = paddle.concat(padded)
        return {"bbox": paddle.concat(out_bbox), "bbox_num": paddle.concat(out_num).astype("int32"), "mask": mask}

    @staticmethod
    def _placeholder_if_empty(rows: paddle.Tensor, probs: paddle.Tensor, n: paddle.Tensor):
        """Append the reference's placeholder detection (box [0, 0, 1, 1] in input pixels, class 0,
        score 0, an all-zero mask) and keep it only when the image has no detection. Written without
        a branch so that it also works inside an exported graph."""
        fake = paddle.to_tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0]], dtype="float32")
        fake_probs = paddle.zeros([1, probs.shape[1], probs.shape[2]], dtype=probs.dtype)
        keep = paddle.maximum(n, paddle.ones_like(n))
        rows = paddle.slice(paddle.concat([rows, fake]), axes=[0], starts=[0], ends=[keep[0]])
        probs = paddle.slice(paddle.concat([probs, fake_probs]), axes=[0], starts=[0], ends=[keep[0]])
        return rows, probs, keep

    # ------------------------------------------------------------------------------- training
    def losses(self, inputs: dict[str, paddle.Tensor],
               targets: list[dict[str, paddle.Tensor]]) -> dict[str, paddle.Tensor]:
        """Training losses of one batch: RPN on sampled anchors, box head(s) on sampled RoIs, mask
        head on their foreground; ``loss`` is the sum of the terms."""
        image, im_shape = inputs["image"], inputs["im_shape"]
        if len(targets) != int(image.shape[0]):
            raise ValueError(f"{len(targets)} targets for a batch of {int(image.shape[0])} images")
        cfg = self.train_cfg
        gts = [self._valid_instances(t) for t in targets]
        for gt in gts:
            labels = gt["labels"]
            if labels.shape[0] and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
                raise ValueError(f"target labels must be in [0, {self.num_classes}), got "
                                 f"{sorted(set(labels.numpy().tolist()))}")
        body_feats = self.backbone(image)
        feats = self.neck(body_feats) if self.neck is not None else body_feats

        # RPN: objectness / deltas against the anchor targets, then the training proposals
        scores, deltas, anchors = self.rpn_head.head_outputs(feats)
        all_anchors = paddle.concat(anchors)
        anchor_targets = [assign_anchors(all_anchors, gt["boxes"], cfg.rpn_batch_size_per_im, cfg.rpn_fg_fraction,
                                         cfg.rpn_positive_overlap, cfg.rpn_negative_overlap) for gt in gts]
        losses = rpn_loss(*flatten_rpn_outputs(scores, deltas), anchor_targets, cfg.rpn_batch_size_per_im)
        proposals, _ = self.rpn_head.train_proposals(
            scores, deltas, anchors, im_shape, pre_nms_top_n=cfg.train_pre_nms_top_n,
            post_nms_top_n=cfg.train_post_nms_top_n, topk_after_collect=cfg.topk_after_collect)

        # RoI heads: proposals + GT boxes, labelled and sampled
        roi_targets = [sample_rois(p, gt["boxes"], gt["labels"], self.num_classes, cfg.roi_batch_size_per_im,
                                   cfg.roi_fg_fraction, cfg.roi_fg_thresh, cfg.roi_bg_thresh)
                       for p, gt in zip(proposals, gts)]
        if isinstance(self.bbox_head, CascadeHead):
            losses.update(self._cascade_box_losses(feats, roi_targets, gts, im_shape))
            head_feat = None
        else:
            head_feat, logits, box_deltas = self.bbox_head.head_outputs(feats, *self._rois(roi_targets))
            losses.update(box_head_loss(logits, box_deltas, roi_targets, self.num_classes,
                                        self.bbox_head.bbox_weight))
        # masks on the foreground RoIs of the (first-stage) sample
        losses["loss_mask"] = self._mask_loss(feats, roi_targets, gts, head_feat)
        losses["loss"] = paddle.add_n(list(losses.values()))
        return losses

    def _cascade_box_losses(self, feats: Sequence[paddle.Tensor], roi_targets: list[RoITargets],
                            gts: list[dict[str, paddle.Tensor]], im_shape: paddle.Tensor) -> dict[str, paddle.Tensor]:
        """Each stage trains on the previous stage's refined boxes (no gradient through them),
        relabelled with its own IoU threshold and not resampled; its terms are scaled by its weight."""
        cfg = self.train_cfg
        losses: dict[str, paddle.Tensor] = {}
        targets = roi_targets
        for stage in range(self.bbox_head.num_stages):
            if stage > 0:
                rois, rois_num = self._rois(targets)
                refined = self.bbox_head.refine(box_deltas.detach(), rois, rois_num, im_shape, stage - 1)
                targets = [sample_rois(self._keep_nonempty(r), gt["boxes"], gt["labels"], self.num_classes,
                                       fg_thresh=cfg.cascade_iou[stage], bg_thresh=cfg.cascade_iou[stage],
                                       add_gt_as_proposals=False, subsample=False)
                           for r, gt in zip(refined, gts)]
            logits, box_deltas = self.bbox_head.stage_outputs(feats, *self._rois(targets), stage)
            stage_losses = box_head_loss(logits, box_deltas, targets, self.num_classes,
                                         self.bbox_head.bbox_weight[stage])
            for k, v in stage_losses.items():
                losses[f"{k}_stage{stage}"] = v * cfg.cascade_stage_loss_weights[stage]
        return losses

    def _mask_loss(self, feats: Sequence[paddle.Tensor], roi_targets: list[RoITargets],
                   gts: list[dict[str, paddle.Tensor]], head_feat: paddle.Tensor | None) -> paddle.Tensor:
        """BCE of the mask logits of the foreground RoIs against their GT masks resampled into them."""
        resolution = self.train_cfg.mask_resolution
        rois, labels, masks, index = [], [], [], []
        offset = 0
        for t, gt in zip(roi_targets, gts):
            fg = t.foreground(self.num_classes)
            fg_rois = paddle.gather(t.rois, fg)
            rois.append(fg_rois)
            labels.append(paddle.gather(t.labels, fg))
            masks.append(mask_targets(gt["masks"], fg_rois, paddle.gather(t.gt_index, fg), resolution))
            index.append(fg + offset)
            offset += int(t.rois.shape[0])
        weight = 1.0
        if sum(int(r.shape[0]) for r in rois) == 0:
            # no foreground in the batch: one zero-weighted RoI keeps the mask head in the graph
            weight = 0.0
            rois = [roi_targets[0].rois[:1]] + [t.rois[:0] for t in roi_targets[1:]]
            labels = [paddle.zeros([1], dtype="int64")]
            masks = [paddle.zeros([1, resolution, resolution], dtype="float32")]
            index = [paddle.zeros([1], dtype="int64")]
        rois_num = paddle.to_tensor([int(r.shape[0]) for r in rois], dtype="int32")
        shared = paddle.gather(head_feat, paddle.concat(index)) if self.mask_head.share_bbox_feat else None
        logits = self.mask_head.forward_train(feats, rois, rois_num, shared_feat=shared)
        return mask_loss(logits, paddle.concat(labels), paddle.concat(masks)) * weight

    @staticmethod
    def _rois(targets: list[RoITargets]) -> tuple[list[paddle.Tensor], paddle.Tensor]:
        """The RoIs of each image and their counts (int32 [B]), as the RoI extractors take them."""
        return [t.rois for t in targets], paddle.to_tensor([int(t.rois.shape[0]) for t in targets], dtype="int32")

    @staticmethod
    def _keep_nonempty(boxes: paddle.Tensor) -> paddle.Tensor:
        """The boxes with positive area (the first one if none has), as PaddleDetection's cascade keeps."""
        keep = nonempty_boxes(boxes)
        return paddle.gather(boxes, keep) if keep.shape[0] > 0 else boxes[:1]

    @staticmethod
    def _valid_instances(target: dict[str, paddle.Tensor]) -> dict[str, paddle.Tensor]:
        """Labels (int64), boxes and masks of the instances whose box has a positive area."""
        boxes = target["boxes"].astype("float32").reshape([-1, 4])
        keep = nonempty_boxes(boxes)
        if keep.shape[0] == boxes.shape[0]:
            return {"labels": target["labels"].astype("int64").reshape([-1]), "boxes": boxes,
                    "masks": target["masks"]}
        return {"labels": paddle.gather(target["labels"].astype("int64").reshape([-1]), keep),
                "boxes": paddle.gather(boxes, keep), "masks": paddle.gather(target["masks"], keep)}


def mask_rcnn(name: str, num_classes: int = 80, roi_align_aligned: bool = True) -> MaskRCNN:
    """The network of ``name`` (a key of :data:`MASK_RCNN_CONFIGS`) with ``num_classes`` classes.

    ``roi_align_aligned``: the configs (and the official training) use True; PaddleDetection's
    ``develop`` branch silently runs False since 2024-08.
    """
    if name not in MASK_RCNN_CONFIGS:
        raise ValueError(f"unknown Mask R-CNN model {name!r}; expected one of {', '.join(MASK_RCNN_NAMES)}")
    cfg = MASK_RCNN_CONFIGS[name]
    if cfg.fpn:
        backbone = ResNet(depth=cfg.depth, variant=cfg.variant, groups=cfg.groups, base_width=cfg.base_width,
                          return_idx=(0, 1, 2, 3))
        neck = FPN(backbone.out_channels, out_channel=256)
        scales = [1.0 / s for s in neck.out_strides]
        # one anchor size per level, 3 ratios: 3 anchors per cell at strides 4..64
        anchors = AnchorGenerator([[32], [64], [128], [256], [512]], (0.5, 1.0, 2.0), neck.out_strides)
        # training proposals: 2000 per level before and after NMS, then the best 1000 (cascade 2000)
        train_cfg = RCNNTrainConfig(train_post_nms_top_n=2000 if cfg.cascade else 1000)
        rpn = RPNHead(256, anchors, pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7, min_size=0.0)
        box_roi = RoIAlign(7, scales, sampling_ratio=0, aligned=roi_align_aligned)
        if cfg.cascade:
            bbox_head = CascadeHead(CascadeTwoFCHead(256, 1024, 7), box_roi, 1024, num_classes)
            prior_box_var = bbox_head.bbox_weight[-1]  # the final decode uses the last stage's deltas
        else:
            bbox_head = BBoxHead(TwoFCHead(256, 1024, 7), box_roi, 1024, num_classes)
            prior_box_var = bbox_head.bbox_weight
        mask_head = MaskHead(MaskFeat(256, 256, num_convs=4),
                             RoIAlign(14, scales, sampling_ratio=0, aligned=roi_align_aligned), num_classes)
    else:
        # C4: RPN and RoIAlign on res4 (stride 16); res5 runs per RoI inside the box head
        backbone = ResNet(depth=cfg.depth, variant=cfg.variant, return_idx=(2,), num_stages=3)
        neck = None
        anchors = AnchorGenerator((32, 64, 128, 256, 512), (0.5, 1.0, 2.0), (16,))
        train_cfg = RCNNTrainConfig(train_pre_nms_top_n=12000, train_post_nms_top_n=2000, topk_after_collect=False,
                                    mask_resolution=14)
        rpn = RPNHead(1024, anchors, pre_nms_top_n=6000, post_nms_top_n=1000, nms_thresh=0.7, min_size=0.0)
        # the single-map path passes no sampling ratio: Paddle's default -1 (adaptive)
        roi = RoIAlign(14, (1.0 / 16,), sampling_ratio=-1, aligned=roi_align_aligned)
        bbox_head = BBoxHead(Res5Head(1024, 512), roi, 2048, num_classes, with_pool=True)
        prior_box_var = bbox_head.bbox_weight
        mask_head = MaskHead(MaskFeat(2048, 256, num_convs=0),
                             RoIAlign(14, (1.0 / 16,), sampling_ratio=-1, aligned=roi_align_aligned),
                             num_classes, share_bbox_feat=True)
    post = BBoxPostProcess(num_classes, prior_box_var, score_threshold=0.05, nms_threshold=0.5, keep_top_k=100)
    # training as the configs: stem + res2 frozen (freeze_at 0), SSLDv2's per-stage learning rates
    backbone.freeze_stages(0)
    if cfg.backbone_lr_mult is not None:
        backbone.set_stage_lr_mult(cfg.backbone_lr_mult)
    return MaskRCNN(backbone, neck, rpn, bbox_head, mask_head, post, model_name=name, train_cfg=train_cfg)
