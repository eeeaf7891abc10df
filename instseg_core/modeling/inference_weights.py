"""Weights of a network read back from an inference dir that instseg exported, to fine-tune from it.

An exported dir holds the network's parameters in ``inference.pdiparams`` under the names
``paddle.jit.save`` gave them, not under the network's own keys. Two kinds of names occur:

* ``<layer>_<k>.<w|b>_<i>_deepcopy_<n>``: parameters of the deep copy the export saves; ``n``
  counts in the copy's visiting order, which is the order of ``state_dict()``;
* ``conv2d_<k>.<w|b>_0``: the 3x3 convolutions that fusing RepVGG blocks creates after the copy
  (``k`` in creation order, the blocks' order), present when the network was fused only at export.

That is enough to put every tensor back on its key. The weights come back in the fused (deploy)
form the graph runs: each RepVGG block a single 3x3 convolution with a bias, so the network is
converted to that form too (:func:`instseg_core.export.convert_to_deploy`) and trains in it: the
same function as the exported model, without the block's training-time second branch. Only
networks with RepVGG blocks differ between the two forms (PP-YOLOE_seg, Mask-RT-DETR's encoder);
for the others the deploy form is the network itself.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["is_inference_dir", "in_deploy_form", "weights_from_inference_dir"]


def is_inference_dir(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is a local directory holding an exported graph (``inference.json``) and its
    parameters (``inference.pdiparams``)."""
    if path is None or "://" in str(path):
        return False
    p = Path(path)
    return p.is_dir() and (p / "inference.json").is_file() and (p / "inference.pdiparams").is_file()


def _repvgg_blocks(model: Any) -> list[str]:
    from instseg_core.modeling.layers import RepVggBlock

    return [name for name, layer in model.named_sublayers() if isinstance(layer, RepVggBlock)]


def in_deploy_form(keys: Iterable[str], model: Any) -> bool:
    """Whether weights with ``keys`` are in the fused form (a RepVGG block's ``conv``, not its
    ``conv1``/``conv2`` branches) while ``model`` has unfused blocks."""
    keys = set(keys)
    blocks = _repvgg_blocks(model)
    return any(f"{b}.conv.weight" in keys and f"{b}.conv1.conv.weight" not in keys for b in blocks) and \
        any(not hasattr(layer, "conv") for name, layer in model.named_sublayers() if name in set(blocks))


def _graph_parameters(model_dir: Path) -> dict[str, np.ndarray]:
    """Parameter name -> value, as the saved program names them (Paddle loads them in name order)."""
    import paddle

    program = json.loads((model_dir / "inference.json").read_text(encoding="utf-8"))
    ops = program["program"]["regions"][0]["blocks"][0]["ops"]
    names = sorted(op["A"][3] for op in ops if op.get("#") == "p")
    values = list(paddle.jit.load(str(model_dir / "inference")).state_dict().values())
    if len(names) != len(values):
        raise ValueError(f"{model_dir}: {len(names)} parameters in the program but {len(values)} loaded")
    return {n: v.numpy() for n, v in zip(names, values)}


def weights_from_inference_dir(model_dir: str | os.PathLike[str], model: Any) -> dict[str, np.ndarray]:
    """``model``'s state dict filled from the exported dir ``model_dir``, in the fused form; ``model``
    is converted to that form in place (see the module doc). ``model`` must be the exported network's
    architecture (same name, classes and arch options): a count or shape that differs is a
    ``ValueError`` naming it."""
    from instseg_core.export import convert_to_deploy

    model_dir = Path(model_dir)
    if not is_inference_dir(model_dir):
        raise ValueError(f"{model_dir} is not an inference dir (inference.json + inference.pdiparams)")
    params = _graph_parameters(model_dir)
    copied = sorted((n for n in params if "_deepcopy_" in n), key=lambda n: int(n.rsplit("_", 1)[1]))
    fused = sorted((n for n in params if "_deepcopy_" not in n),
                   key=lambda n: (int(re.search(r"_(\d+)\.", n).group(1)), n.endswith(".b_0")))
    blocks = _repvgg_blocks(model)
    if fused:  # blocks fused at export: the copy's own keys lack their branches
        branches = tuple(f"{b}.{part}" for b in blocks for part in ("conv1.", "conv2.", "alpha"))
        copy_keys = [k for k in model.state_dict() if not k.startswith(branches)]
        fused_keys = [f"{b}.conv.{p}" for b in blocks for p in ("weight", "bias")]
        convert_to_deploy(model)
    else:  # a network exported already fused
        convert_to_deploy(model)
        copy_keys, fused_keys = list(model.state_dict()), []
    if len(copied) != len(copy_keys) or len(fused) != len(fused_keys):
        raise ValueError(f"{model_dir} does not fit this network: {len(copied)} + {len(fused)} parameters in the dir, "
                         f"{len(copy_keys)} + {len(fused_keys)} expected (another model, class count or arch?)")
    state = dict(zip(copy_keys, (params[n] for n in copied)))
    state.update(zip(fused_keys, (params[n] for n in fused)))
    target = model.state_dict()
    for key, value in state.items():
        if tuple(target[key].shape) != value.shape:
            raise ValueError(f"{model_dir} does not fit this network: {key} is {list(value.shape)} in the dir, "
                             f"{list(target[key].shape)} in the network")
    return state
