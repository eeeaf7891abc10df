from .ppyoloe_ins import PPYOLOEInsHead, ppyoloe_ins_head_s

__all__ = ["PPYOLOEInsHead", "ppyoloe_ins_head_s"]
