"""PP-YOLOE_seg: CSPResNet backbone + CustomCSPPAN neck + PPYOLOEInsHead; inference and training."""
from __future__ import annotations

from typing import Dict, List, Optional

import paddle
import paddle.nn as nn

from .backbones.cspresnet import cspresnet_s
from .heads.ppyoloe_ins import ppyoloe_ins_head_s
from .losses.ppyoloe_loss import PPYOLOESegLoss
from .necks.custom_csp_pan import custom_csp_pan_s


class PPYOLOESeg(nn.Layer):
    """Eval: ``forward({'image', 'im_shape', 'scale_factor'})`` -> ``{'bbox', 'bbox_num', 'mask'}``.

    ``bbox`` [N,6] float32 = [class, score, x1, y1, x2, y2] in original-image pixels (not clipped),
    ``bbox_num`` [1] int32, ``mask`` [N,H0,W0] float32 0./1. Batch size 1.

    Train: ``forward({'image'}, targets)`` -> ``{'loss', 'loss_cls', 'loss_iou', 'loss_dfl',
    'loss_mask', 'loss_l1'}`` (see :class:`~.losses.ppyoloe_loss.PPYOLOESegLoss` and the batch
    format of ``instseg_core.training.data``); any input size that is a multiple of 32.
    """

    def __init__(self, backbone: nn.Layer, neck: nn.Layer, yolo_head: nn.Layer):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.yolo_head = yolo_head
        # a plain object, not a sub-layer: the criterion holds no state and adds no state-dict keys
        self.criterion = PPYOLOESegLoss(num_classes=yolo_head.num_classes, reg_max=yolo_head.reg_max)

    def head_outputs(self, image: paddle.Tensor):
        return self.yolo_head(self.neck(self.backbone(image)))

    def forward(self, inputs: Dict[str, paddle.Tensor],
                targets: Optional[List[Dict[str, paddle.Tensor]]] = None):
        image = inputs["image"]
        if self.training:
            if targets is None:
                raise ValueError("training forward needs targets: model(inputs, targets)")
            outputs = self.yolo_head.forward_train(self.neck(self.backbone(image)))
            return self.criterion(outputs, targets, input_hw=(int(image.shape[2]), int(image.shape[3])))
        head_outs = self.head_outputs(image)
        return self.yolo_head.post_process(head_outs, inputs["im_shape"], inputs["scale_factor"],
                                           input_hw=(int(image.shape[2]), int(image.shape[3])))


def ppyoloe_seg_s(num_classes: int = 80, width_mult: float = 0.50, depth_mult: float = 0.33,
                  num_protos: int = 128) -> PPYOLOESeg:
    """PP-YOLOE_seg-S; other ``width_mult`` / ``depth_mult`` / ``num_protos`` give scaled variants
    (the official weights fit only the defaults)."""
    backbone = cspresnet_s(width_mult=width_mult, depth_mult=depth_mult)
    neck = custom_csp_pan_s(in_channels=backbone.out_channels, width_mult=width_mult, depth_mult=depth_mult)
    head = ppyoloe_ins_head_s(num_classes=num_classes, in_channels=neck.out_channels, num_protos=num_protos)
    return PPYOLOESeg(backbone, neck, head)
