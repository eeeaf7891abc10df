from instseg_core.modeling.necks.custom_csp_pan import CustomCSPPAN

__all__ = ["CustomCSPPAN"]
