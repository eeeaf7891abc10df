from instseg_core.modeling.heads.mask_rtdetr import MaskRTDETRTransformer, mask_rtdetr_post_process
from instseg_core.modeling.heads.ppyoloe_ins import PPYOLOEInsHead, ppyoloe_ins_head_s

__all__ = ["MaskRTDETRTransformer", "PPYOLOEInsHead", "mask_rtdetr_post_process", "ppyoloe_ins_head_s"]
