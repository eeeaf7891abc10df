"""Clean reimplementation of PaddleDetection model sub-modules as plain ``paddle.nn.Layer`` s.

State-dict key names and shapes follow the official ``.pdparams`` of the
corresponding PaddleDetection configs, so official (or oracle) weights load
directly with ``set_state_dict``.
"""
from .backbones.cspresnet import CSPResNet
from .build import build_model
from .heads.ppyoloe_ins import PPYOLOEInsHead
from .mask_rtdetr import MaskRTDETR
from .necks.custom_csp_pan import CustomCSPPAN
from .ppyoloe_seg import PPYOLOESeg

__all__ = ["CSPResNet", "CustomCSPPAN", "MaskRTDETR", "PPYOLOEInsHead", "PPYOLOESeg", "build_model"]
