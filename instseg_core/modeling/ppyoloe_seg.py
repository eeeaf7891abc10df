"""PP-YOLOE_seg: CSPResNet backbone + CustomCSPPAN neck + PPYOLOEInsHead, eval-mode forward."""
from __future__ import annotations

from typing import Dict

import paddle
import paddle.nn as nn

from .backbones.cspresnet import cspresnet_s
from .heads.ppyoloe_ins import ppyoloe_ins_head_s
from .necks.custom_csp_pan import custom_csp_pan_s


class PPYOLOESeg(nn.Layer):
    """``forward({'image', 'im_shape', 'scale_factor'})`` -> ``{'bbox', 'bbox_num', 'mask'}``.

    ``bbox`` [N,6] float32 = [class, score, x1, y1, x2, y2] in original-image pixels (not clipped),
    ``bbox_num`` [1] int32, ``mask`` [N,H0,W0] float32 0./1. Batch size 1.
    """

    def __init__(self, backbone: nn.Layer, neck: nn.Layer, yolo_head: nn.Layer):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.yolo_head = yolo_head

    def head_outputs(self, image: paddle.Tensor):
        return self.yolo_head(self.neck(self.backbone(image)))

    def forward(self, inputs: Dict[str, paddle.Tensor]):
        image = inputs["image"]
        head_outs = self.head_outputs(image)
        if self.training:
            raise NotImplementedError("PPYOLOESeg training loss is not implemented; use eval()")
        return self.yolo_head.post_process(head_outs, inputs["im_shape"], inputs["scale_factor"],
                                           input_hw=(int(image.shape[2]), int(image.shape[3])))


def ppyoloe_seg_s(num_classes: int = 80) -> PPYOLOESeg:
    backbone = cspresnet_s()
    neck = custom_csp_pan_s(in_channels=backbone.out_channels)
    head = ppyoloe_ins_head_s(num_classes=num_classes, in_channels=neck.out_channels)
    return PPYOLOESeg(backbone, neck, head)
