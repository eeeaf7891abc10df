"""Mask-RT-DETR S/M/L/X/H: HGNetV2 backbone + MaskHybridEncoder neck + Mask-RT-DETR transformer.

Sub-layers are registered as ``backbone``, ``transformer``, ``neck`` so that ``state_dict()``
keys, shapes and order equal the official ``.pdparams`` (the reference ``DETR`` builds them in
this order; the ``MaskDINOHead`` has no parameters).
"""
from __future__ import annotations

from typing import Dict

import paddle
import paddle.nn as nn

from .backbones.hgnetv2 import hgnetv2
from .heads.mask_rtdetr import (MaskRTDETRTransformer, mask_rtdetr_post_process,
                                 mask_rtdetr_post_process_batch)
from .necks.mask_hybrid_encoder import MASK_HYBRID_ENCODER_CONFIGS, mask_hybrid_encoder

__all__ = ["MaskRTDETR", "mask_rtdetr"]


class MaskRTDETR(nn.Layer):
    """``forward({'image', 'im_shape', 'scale_factor'})`` -> ``{'bbox', 'bbox_num', 'mask'}``.

    ``bbox`` [100,6] float32 = [class, score, x1, y1, x2, y2] in original-image pixels (not clipped),
    ``bbox_num`` [1] int32, ``mask`` [100,H0,W0] int32. Eval only. A batch of B images gives
    [B*100,6] / [B] / [B*100,Hmax,Wmax]: each image's masks at its own original size, padded with 0.
    """

    def __init__(self, backbone: nn.Layer, transformer: MaskRTDETRTransformer, neck: nn.Layer,
                 num_top_queries: int = 100):
        super().__init__()
        self.backbone = backbone
        self.transformer = transformer
        self.neck = neck
        self.num_top_queries = num_top_queries

    def head_outputs(self, image: paddle.Tensor):
        feats, mask_feat = self.neck(self.backbone(image))
        return self.transformer(feats, mask_feat)

    def forward(self, inputs: Dict[str, paddle.Tensor]):
        if self.training:
            raise NotImplementedError("MaskRTDETR training loss is not implemented; use eval()")
        logits, boxes, masks, _ = self.head_outputs(inputs["image"])
        if int(inputs["image"].shape[0]) != 1:
            return mask_rtdetr_post_process_batch(logits[-1], boxes[-1], masks[-1], inputs["im_shape"],
                                                  inputs["scale_factor"], self.num_top_queries)
        return mask_rtdetr_post_process(logits[-1], boxes[-1], masks[-1], inputs["im_shape"],
                                        inputs["scale_factor"], self.num_top_queries)


def mask_rtdetr(size: str, num_classes: int = 80) -> MaskRTDETR:
    size = size.upper()
    if size not in MASK_HYBRID_ENCODER_CONFIGS:
        raise ValueError(f"unknown Mask-RT-DETR size {size!r}; expected S, M, L, X or H")
    cfg = MASK_HYBRID_ENCODER_CONFIGS[size]
    transformer = MaskRTDETRTransformer(in_channels=cfg["hidden_dim"], hidden_dim=256,
                                        num_classes=num_classes, num_prototypes=cfg["num_prototypes"])
    model = MaskRTDETR(hgnetv2(size), transformer, mask_hybrid_encoder(size))
    model.model_name = f"Mask-RT-DETR-{size}"  # export_model reads it
    return model
