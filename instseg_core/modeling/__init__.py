"""Clean reimplementation of PaddleDetection model sub-modules as plain ``paddle.nn.Layer`` s.

State-dict key names and shapes follow the official ``.pdparams`` of the
corresponding PaddleDetection configs, so official (or oracle) weights load
directly with ``set_state_dict``.
"""
from .backbones.cspresnet import CSPResNet
from .necks.custom_csp_pan import CustomCSPPAN

__all__ = ["CSPResNet", "CustomCSPPAN"]
