"""The contract of every network in :mod:`instseg_core.modeling`, as PaddleDetection's ``BaseArch``
and mmdetection's ``BaseDetector`` give theirs.

Batches (the format of :mod:`instseg_core.training.data` and of the exported graph's inputs):

* ``inputs``: ``{"image": [B, 3, H, W] float32, "im_shape": [B, 2] (the resized image's h, w),
  "scale_factor": [B, 2] (resized / original, y then x)}``;
* ``targets``: one dict per image, ``{"labels": [n] int, "boxes": [n, 4] xyxy input pixels,
  "masks": [n, H, W]}``.

Three entry points:

* train mode, ``model(inputs, targets)`` -> :meth:`InstanceSegModel.losses`: ``{"loss": the total
  to minimise, "loss_<term>": ...}``;
* eval mode, ``model(inputs)`` -> :meth:`InstanceSegModel.predict` restricted to ``output_keys``:
  the detections, in original-image pixels, in the exported graph's convention (box families
  ``bbox`` [N, 6] = [class, score, x1, y1, x2, y2], ``bbox_num`` [B], ``mask`` [N, H0, W0]; SOLOv2
  ``bbox_num``, ``cate_label``, ``cate_score``, ``segm``);
* export, :meth:`InstanceSegModel.export_forward` ``(im_shape, image, scale_factor)``: the body of
  the graph :func:`instseg_core.export.export_model` saves (``paddle.jit.save``), which may differ
  from ``predict`` (a batch-capable post-process, a score floor).

Networks whose graph splits cleanly also give the two halves of ``export_forward``, exported as
their own graphs for the high-performance backends (:mod:`instseg_core.inference.hpi`):
:meth:`InstanceSegModel.export_head` (the network up to its raw head outputs, static ops only:
what ONNX Runtime and OpenVINO run well) and :meth:`InstanceSegModel.export_post` (top-k / NMS
and the masks, data-dependent: Paddle Inference runs it). ``export_forward`` is their composition.

Which family a network belongs to, and what differs between families, is in
:mod:`instseg_core.families`.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from instseg_core.inference.postprocess import BOX_OUTPUTS

__all__ = ["InstanceSegModel"]

Tensors = dict[str, paddle.Tensor]


class InstanceSegModel(nn.Layer):
    """Base of the four networks (PP-YOLOE_seg, Mask-RT-DETR, Mask R-CNN / Cascade, SOLOv2).

    It holds no parameters and no sub-layers, so a subclass's ``state_dict()`` keys are its own
    (the official ``.pdparams`` names). Subclasses implement :meth:`losses` and :meth:`predict`, and
    :meth:`export_forward` where the exported graph differs from ``predict``; they set
    ``num_classes`` (an attribute or a property) and, per instance or class, ``model_name`` (the
    official name, which tells the family).
    """

    model_name: str | None = None
    # what the eval forward and the exported graph return, in the graph's order (sorted keys)
    output_keys: tuple[str, ...] = BOX_OUTPUTS
    num_classes: int
    # the raw head outputs of :meth:`export_head`, in order; empty: the graph does not split
    raw_output_names: tuple[str, ...] = ()

    def forward(self, inputs: Tensors, targets: list[Tensors] | None = None) -> Tensors:
        """Train mode: :meth:`losses`; eval mode: :meth:`predict` restricted to ``output_keys``."""
        if self.training:
            if targets is None:
                raise ValueError(f"{type(self).__name__} in training mode needs targets: model(inputs, targets)")
            return self.losses(inputs, targets)
        return self._graph_outputs(inputs)

    def losses(self, inputs: Tensors, targets: list[Tensors]) -> Tensors:
        """The training losses of a batch: ``loss`` (the total) and its named terms."""
        raise NotImplementedError

    def predict(self, inputs: Tensors) -> Tensors:
        """The detections of a batch (see the module docstring); may add diagnostic entries beyond
        ``output_keys`` (Mask R-CNN's intermediate results)."""
        raise NotImplementedError

    def export_forward(self, im_shape: paddle.Tensor, image: paddle.Tensor, scale_factor: paddle.Tensor, *,
                       input_hw: tuple[int, int] | None = None, score_floor: float | None = None) -> Tensors:
        """The exported graph's body. ``input_hw``: the graph's fixed input size (None: any size);
        ``score_floor``: drop detections scoring at or below it before drawing their masks (None:
        the model's own rule). This default is the eval forward and ignores both: for the families
        whose graphs run one image per call with their own thresholds (R-CNN, SOLOv2)."""
        return self._graph_outputs({"image": image, "im_shape": im_shape, "scale_factor": scale_factor})

    def export_head(self, image: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        """The network up to its raw head outputs (``raw_output_names``), for a split export."""
        raise NotImplementedError(f"{type(self).__name__} does not split into head and post-process graphs")

    def export_post(self, im_shape: paddle.Tensor, scale_factor: paddle.Tensor, raw: tuple[paddle.Tensor, ...], *,
                    input_hw: tuple[int, int] | None = None, score_floor: float | None = None,
                    keep_above: paddle.Tensor | None = None) -> Tensors:
        """The post-process of :meth:`export_head`'s outputs: the same outputs as :meth:`export_forward`,
        less the detections scoring at or below ``keep_above`` ([1], the caller's threshold as a graph
        input: no mask is drawn for what the caller drops anyway)."""
        raise NotImplementedError(f"{type(self).__name__} does not split into head and post-process graphs")

    def _graph_outputs(self, inputs: Tensors) -> Tensors:
        out = self.predict(inputs)
        return {k: out[k] for k in self.output_keys}
