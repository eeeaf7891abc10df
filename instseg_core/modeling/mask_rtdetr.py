"""Mask-RT-DETR S/M/L/X/H: HGNetV2 backbone + MaskHybridEncoder neck + Mask-RT-DETR transformer.

Sub-layers are registered as ``backbone``, ``transformer``, ``neck`` so that ``state_dict()``
keys, shapes and order equal the official ``.pdparams`` (the reference ``DETR`` builds them in
this order; the ``MaskDINOHead`` has no parameters).

Training: ``model.train(); model(inputs, targets)`` -> ``{"loss": total, "loss_class": ...}``
(batch format: ``instseg_core.training.data``); the criterion is ``losses.detr_loss.MaskDINOLoss``
with the reference ``MaskDINOHead`` settings (varifocal with mask-IoU targets, weights
class 4 / bbox 5 / giou 2 / mask 5 / dice 5, mask losses on 12544 uncertainty-sampled points
per mask; the matcher's mask costs are dense on the stride-4 grid).
"""
from __future__ import annotations

import paddle

from instseg_core.modeling.backbones.hgnetv2 import hgnetv2
from instseg_core.modeling.base import InstanceSegModel
from instseg_core.modeling.heads.mask_rtdetr import (MaskRTDETRTransformer, mask_rtdetr_post_process,
                                                     mask_rtdetr_post_process_batch)
from instseg_core.modeling.losses.box_ops import xyxy_to_cxcywh
from instseg_core.modeling.losses.detr_loss import MaskDINOLoss
from instseg_core.modeling.necks.mask_hybrid_encoder import MASK_HYBRID_ENCODER_CONFIGS, mask_hybrid_encoder

__all__ = ["MaskRTDETR", "mask_rtdetr", "normalize_targets"]


class MaskRTDETR(InstanceSegModel):
    """``forward({'image', 'im_shape', 'scale_factor'})`` -> ``{'bbox', 'bbox_num', 'mask'}``.

    ``bbox`` [100,6] float32 = [class, score, x1, y1, x2, y2] in original-image pixels (not clipped),
    ``bbox_num`` [1] int32, ``mask`` [100,H0,W0] uint8. A batch of B images gives
    [B*100,6] / [B] / [B*100,Hmax,Wmax]: each image's masks at its own original size, padded with 0.
    In training mode ``forward(inputs, targets)`` returns the loss dict instead (:meth:`losses`).
    """

    def __init__(self, backbone: paddle.nn.Layer, transformer: MaskRTDETRTransformer, neck: paddle.nn.Layer,
                 num_top_queries: int = 100):
        super().__init__()
        self.backbone = backbone
        self.transformer = transformer
        self.neck = neck
        self.num_top_queries = num_top_queries
        # a plain object, not a sub-layer: it has no parameters and stays out of state_dict()
        self.criterion = MaskDINOLoss(transformer.num_classes)

    @property
    def num_classes(self) -> int:
        """The number of classes the queries score."""
        return self.transformer.num_classes

    def head_outputs(self, image: paddle.Tensor, query_index: paddle.Tensor | None = None):
        """Eval transformer outputs (reference nesting); ``query_index`` replaces the query selection
        (``MaskRTDETRTransformer.select_queries``)."""
        feats, mask_feat = self.neck(self.backbone(image))
        return self.transformer(feats, mask_feat, query_index=query_index)

    def predict(self, inputs: dict[str, paddle.Tensor]) -> dict[str, paddle.Tensor]:
        """Detections of a batch (see the class docstring)."""
        logits, boxes, masks, _ = self.head_outputs(inputs["image"])
        if int(inputs["image"].shape[0]) != 1:
            return mask_rtdetr_post_process_batch(logits[-1], boxes[-1], masks[-1], inputs["im_shape"],
                                                  inputs["scale_factor"], self.num_top_queries)
        return mask_rtdetr_post_process(logits[-1], boxes[-1], masks[-1], inputs["im_shape"],
                                        inputs["scale_factor"], self.num_top_queries)

    raw_output_names = ("logits", "boxes", "masks")

    def export_head(self, image: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        """The last decoder layer's class logits [B,Q,C], boxes [B,Q,4] (normalised cxcywh) and
        mask logits [B,Q,h,w]."""
        logits, boxes, masks, _ = self.head_outputs(image)
        return logits[-1], boxes[-1], masks[-1]

    def export_post(self, im_shape: paddle.Tensor, scale_factor: paddle.Tensor, raw: tuple[paddle.Tensor, ...], *,
                    input_hw: tuple[int, int] | None = None, score_floor: float | None = None,
                    keep_above: paddle.Tensor | None = None) -> dict[str, paddle.Tensor]:
        """Top-k (query, class) pairs and their masks at each image's original size."""
        logits, boxes, masks = raw
        return mask_rtdetr_post_process_batch(logits, boxes, masks, im_shape, scale_factor, self.num_top_queries,
                                              score_floor=score_floor, keep_above=keep_above)

    def export_forward(self, im_shape: paddle.Tensor, image: paddle.Tensor, scale_factor: paddle.Tensor, *,
                       input_hw: tuple[int, int] | None = None,
                       score_floor: float | None = None) -> dict[str, paddle.Tensor]:
        """The batch-capable post-process (each image's masks at its own original size, zero-padded
        to the largest of the batch), with ``score_floor`` (see the base class)."""
        return self.export_post(im_shape, scale_factor, self.export_head(image), input_hw=input_hw,
                                score_floor=score_floor)

    def losses(self, inputs: dict[str, paddle.Tensor],
               targets: list[dict[str, paddle.Tensor]]) -> dict[str, paddle.Tensor]:
        """Training losses of a batch; ``targets`` boxes are xyxy input pixels (data module format)."""
        image = inputs["image"]
        norm = normalize_targets(targets, int(image.shape[2]), int(image.shape[3]))
        feats, mask_feat = self.neck(self.backbone(image))
        out = self.transformer(feats, mask_feat, norm)
        return self.criterion(out.predictions, norm, out.dn_predictions, out.dn_group)


def normalize_targets(targets: list[dict[str, paddle.Tensor]], height: int, width: int
                      ) -> list[dict[str, paddle.Tensor]]:
    """xyxy input-pixel boxes -> cxcywh normalised by the input size (what the queries predict)."""
    scale = paddle.to_tensor([width, height, width, height], dtype="float32")
    out = []
    for t in targets:
        boxes = t["boxes"].astype("float32").reshape([-1, 4])
        out.append({"labels": t["labels"].astype("int64").reshape([-1]),
                    "boxes": xyxy_to_cxcywh(boxes / scale),
                    "masks": t["masks"].astype("float32")})
    return out


def mask_rtdetr(size: str, num_classes: int = 80) -> MaskRTDETR:
    """Mask-RT-DETR of ``size`` (S, M, L, X or H) with ``num_classes`` classes."""
    size = size.upper()
    if size not in MASK_HYBRID_ENCODER_CONFIGS:
        raise ValueError(f"unknown Mask-RT-DETR size {size!r}; expected S, M, L, X or H")
    cfg = MASK_HYBRID_ENCODER_CONFIGS[size]
    transformer = MaskRTDETRTransformer(in_channels=cfg["hidden_dim"], hidden_dim=256,
                                        num_classes=num_classes, num_prototypes=cfg["num_prototypes"])
    model = MaskRTDETR(hgnetv2(size), transformer, mask_hybrid_encoder(size))
    model.model_name = f"Mask-RT-DETR-{size}"  # the official name tells the family (export, evaluation)
    return model
