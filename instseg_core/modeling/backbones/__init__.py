from instseg_core.modeling.backbones.cspresnet import CSPResNet

__all__ = ["CSPResNet"]
