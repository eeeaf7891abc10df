from .mask_rtdetr import MaskRTDETRTransformer, mask_rtdetr_post_process
from .ppyoloe_ins import PPYOLOEInsHead, ppyoloe_ins_head_s

__all__ = ["MaskRTDETRTransformer", "PPYOLOEInsHead", "mask_rtdetr_post_process", "ppyoloe_ins_head_s"]
