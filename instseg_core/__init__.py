"""instseg_core: PaddleX-compatible instance segmentation on PaddlePaddle (single machine, no Ray)."""

from instseg_core.models import MODEL_NAMES, MODEL_SPECS, ModelSpec, get_spec
from instseg_core.structures import Instances

__all__ = ["create_model", "Instances", "MODEL_NAMES", "MODEL_SPECS", "ModelSpec", "get_spec"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import instseg_core` (e.g. for specs or masks) does not import Paddle.
    if name == "create_model":
        from instseg_core.inference.predictor import create_model

        return create_model
    raise AttributeError(name)
