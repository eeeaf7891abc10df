"""Clean reimplementation of PaddleDetection model sub-modules as plain ``paddle.nn.Layer`` s.

State-dict key names and shapes follow the official ``.pdparams`` of the
corresponding PaddleDetection configs, so official (or oracle) weights load
directly with ``set_state_dict``. Every network follows :class:`InstanceSegModel`
(:mod:`instseg_core.modeling.base`).
"""
from instseg_core.modeling.backbones.cspresnet import CSPResNet
from instseg_core.modeling.base import InstanceSegModel
from instseg_core.modeling.build import build_model
from instseg_core.modeling.heads.ppyoloe_ins import PPYOLOEInsHead
from instseg_core.modeling.mask_rtdetr import MaskRTDETR
from instseg_core.modeling.necks.custom_csp_pan import CustomCSPPAN
from instseg_core.modeling.ppyoloe_seg import PPYOLOESeg

__all__ = ["CSPResNet", "CustomCSPPAN", "InstanceSegModel", "MaskRTDETR", "PPYOLOEInsHead", "PPYOLOESeg",
           "build_model"]
