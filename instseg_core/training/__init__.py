"""Training: COCO data and targets, losses live with the models (``instseg_core.modeling``)."""
