"""PP-YOLOE_seg: CSPResNet backbone + CustomCSPPAN neck + PPYOLOEInsHead; inference and training."""
from __future__ import annotations

import paddle
import paddle.nn as nn

from instseg_core.modeling.backbones.cspresnet import cspresnet_s
from instseg_core.modeling.base import InstanceSegModel
from instseg_core.modeling.heads.ppyoloe_ins import ppyoloe_ins_head_s
from instseg_core.modeling.losses.ppyoloe_loss import PPYOLOESegLoss
from instseg_core.modeling.necks.custom_csp_pan import custom_csp_pan_s


class PPYOLOESeg(InstanceSegModel):
    """Eval: ``forward({'image', 'im_shape', 'scale_factor'})`` -> ``{'bbox', 'bbox_num', 'mask'}``.

    ``bbox`` [N,6] float32 = [class, score, x1, y1, x2, y2] in original-image pixels (not clipped),
    ``bbox_num`` [1] int32, ``mask`` [N,H0,W0] float32 0./1. Batch size 1; the exported graph
    (:meth:`export_forward`) takes a batch.

    Train: ``forward({'image'}, targets)`` -> ``{'loss', 'loss_cls', 'loss_iou', 'loss_dfl',
    'loss_mask', 'loss_l1'}`` (see :class:`~.losses.ppyoloe_loss.PPYOLOESegLoss` and the batch
    format of ``instseg_core.training.data``); any input size that is a multiple of 32.
    """

    model_name = "PP-YOLOE_seg-S"  # scaled variants (width_mult, ...) keep the name: same family, same export

    def __init__(self, backbone: nn.Layer, neck: nn.Layer, yolo_head: nn.Layer):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.yolo_head = yolo_head
        # a plain object, not a sub-layer: the criterion holds no state and adds no state-dict keys
        self.criterion = PPYOLOESegLoss(num_classes=yolo_head.num_classes, reg_max=yolo_head.reg_max)

    @property
    def num_classes(self) -> int:
        """The number of classes the head scores."""
        return self.yolo_head.num_classes

    def head_outputs(self, image: paddle.Tensor):
        """Eval head outputs (scores, distances, mask coefficients, prototypes, anchors, strides)."""
        return self.yolo_head(self.neck(self.backbone(image)))

    def losses(self, inputs: dict[str, paddle.Tensor],
               targets: list[dict[str, paddle.Tensor]]) -> dict[str, paddle.Tensor]:
        """Training losses of a batch (see the class docstring)."""
        image = inputs["image"]
        outputs = self.yolo_head.forward_train(self.neck(self.backbone(image)))
        return self.criterion(outputs, targets, input_hw=(int(image.shape[2]), int(image.shape[3])))

    def predict(self, inputs: dict[str, paddle.Tensor]) -> dict[str, paddle.Tensor]:
        """Detections of image 0 (the reference's batch-1 post-process)."""
        image = inputs["image"]
        return self.yolo_head.post_process(self.head_outputs(image), inputs["im_shape"], inputs["scale_factor"],
                                           input_hw=(int(image.shape[2]), int(image.shape[3])))

    raw_output_names = ("scores", "distances", "coefs", "protos")

    def export_head(self, image: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        """Sigmoid class scores [B,C,A], DFL distances [B,A,4], mask coefficients [B,M,A] and
        prototypes [B,M,h,w]: the head without its (input-size constant) anchors."""
        scores, dist, coefs, protos, _, _ = self.head_outputs(image)
        return scores, dist, coefs, protos

    def export_post(self, im_shape: paddle.Tensor, scale_factor: paddle.Tensor, raw: tuple[paddle.Tensor, ...], *,
                    input_hw: tuple[int, int] | None = None, score_floor: float | None = None,
                    keep_above: paddle.Tensor | None = None) -> dict[str, paddle.Tensor]:
        """NMS and masks of :meth:`export_head`'s outputs for the square input ``input_hw``."""
        if input_hw is None:
            raise ValueError("PP-YOLOE_seg's post-process needs the graph's input size (input_hw)")
        anchor_points, stride_tensor = self.yolo_head.anchors_for_input(input_hw)
        return self.yolo_head.post_process_batch((*raw, anchor_points, stride_tensor), im_shape, scale_factor,
                                                 input_hw=input_hw, score_floor=score_floor, keep_above=keep_above)

    def export_forward(self, im_shape: paddle.Tensor, image: paddle.Tensor, scale_factor: paddle.Tensor, *,
                       input_hw: tuple[int, int] | None = None,
                       score_floor: float | None = None) -> dict[str, paddle.Tensor]:
        """The batch-capable post-process, with ``score_floor`` (see the base class). ``input_hw`` is
        required: the square input the graph is exported for (no branch on it here: the body is
        converted by ``paddle.jit``)."""
        return self.export_post(im_shape, scale_factor, self.export_head(image), input_hw=input_hw,
                                score_floor=score_floor)


def ppyoloe_seg_s(num_classes: int = 80, width_mult: float = 0.50, depth_mult: float = 0.33,
                  num_protos: int = 128) -> PPYOLOESeg:
    """PP-YOLOE_seg-S; other ``width_mult`` / ``depth_mult`` / ``num_protos`` give scaled variants
    (the official weights fit only the defaults)."""
    backbone = cspresnet_s(width_mult=width_mult, depth_mult=depth_mult)
    neck = custom_csp_pan_s(in_channels=backbone.out_channels, width_mult=width_mult, depth_mult=depth_mult)
    head = ppyoloe_ins_head_s(num_classes=num_classes, in_channels=neck.out_channels, num_protos=num_protos)
    return PPYOLOESeg(backbone, neck, head)
