from .custom_csp_pan import CustomCSPPAN

__all__ = ["CustomCSPPAN"]
