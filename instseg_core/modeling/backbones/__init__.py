from .cspresnet import CSPResNet

__all__ = ["CSPResNet"]
