"""Re-export an instseg PP-YOLOE_seg inference dir (e.g. ``samples/model``) with the current graph,
from the weights inside it: no training checkpoint needed.

``paddle.jit.save`` names every parameter of the deep-copied network ``<layer>_<k>.<w|b>_<i>_deepcopy_<n>``
(``n`` in the copy's visiting order, which is the state-dict order) and the RepVGG blocks fused after the
copy get fresh ``conv2d_<k>`` names in creation order (a network fused before the copy, as this script
exports, has only the first kind). That is enough to put each tensor back on its
structured key; the script then checks the new export against the old one on the sample images.

    .venv/bin/python bench/reexport_demo.py samples/model OUT_DIR --width-mult 0.25 --num-protos 32 --num-classes 4
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _graph_params(model_dir: Path) -> dict[str, np.ndarray]:
    """Parameter name -> value, read with Paddle's own loader (names are sorted in its state dict)."""
    import paddle

    layer = paddle.jit.load(str(model_dir / "inference"))
    ops = json.loads((model_dir / "inference.json").read_text())["program"]["regions"][0]["blocks"][0]["ops"]
    names = sorted(o["A"][3] for o in ops if o["#"] == "p")
    values = list(layer.state_dict().values())
    if len(names) != len(values):
        raise SystemExit(f"{model_dir}: {len(names)} parameters in the program, {len(values)} loaded")
    return {n: v.numpy() for n, v in zip(names, values)}


def structured_state(model_dir: Path, model) -> dict[str, np.ndarray]:
    """The fused network's state dict (structured keys) filled from an exported dir."""
    from instseg_core.export import convert_to_deploy
    from instseg_core.modeling.layers import RepVggBlock

    params = _graph_params(model_dir)
    copied = sorted((n for n in params if "_deepcopy_" in n), key=lambda n: int(n.rsplit("_", 1)[1]))
    fused = sorted((n for n in params if "_deepcopy_" not in n),
                   key=lambda n: (int(re.search(r"_(\d+)\.", n).group(1)), n.endswith(".b_0")))
    if not fused:  # exported from an already fused network (e.g. by this script): one ordered list
        convert_to_deploy(model)
        keys = list(model.state_dict())
        if len(copied) != len(keys):
            raise SystemExit(f"parameter counts differ: {len(copied)} in the dir, {len(keys)} in the network")
        state = dict(zip(keys, (params[n] for n in copied)))
        _check_shapes(model, state)
        return state
    blocks = [name for name, layer in model.named_sublayers() if isinstance(layer, RepVggBlock)]
    dropped = tuple(f"{b}.{part}" for b in blocks for part in ("conv1.", "conv2.", "alpha"))
    unfused_keys = [k for k in model.state_dict() if not k.startswith(dropped)]
    convert_to_deploy(model)
    fused_keys = [f"{name}.conv.{p}" for name, layer in model.named_sublayers() if isinstance(layer, RepVggBlock)
                  for p in ("weight", "bias")]
    if len(copied) != len(unfused_keys) or len(fused) != len(fused_keys):
        raise SystemExit(f"parameter counts differ: {len(copied)}/{len(unfused_keys)}, {len(fused)}/{len(fused_keys)}")
    state = dict(zip(unfused_keys, (params[n] for n in copied)))
    state.update(zip(fused_keys, (params[n] for n in fused)))
    _check_shapes(model, state)
    return state


def _check_shapes(model, state: dict[str, np.ndarray]) -> None:
    target = model.state_dict()
    for k, v in state.items():
        if tuple(target[k].shape) != v.shape:
            raise SystemExit(f"{k}: shape {v.shape} in the dir, {tuple(target[k].shape)} in the network")


def main(argv=None) -> int:
    import cv2
    import paddle
    import yaml

    from instseg_core import create_model
    from instseg_core.export import export_model
    from instseg_core.modeling.build import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--num-protos", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--images", default="samples/shapes")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    cfg = yaml.safe_load((src / "inference.yml").read_text())
    model = build_model("PP-YOLOE_seg-S", num_classes=args.num_classes, width_mult=args.width_mult,
                        num_protos=args.num_protos)
    model.eval()
    state = structured_state(src, model)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    size = [op for op in cfg["Preprocess"] if op["type"] == "Resize"][0]["target_size"][0]
    export_model(model, None, dst, input_size=int(size), labels=cfg["label_list"],
                 draw_threshold=float(cfg["draw_threshold"]))

    old, new = create_model(model_dir=src), create_model(model_dir=dst)
    worst = 1.0
    for path in sorted(Path(args.images).glob("*.jpg")):
        img = cv2.imread(str(path))
        a, b = old.predict_arrays([img])[0], new.predict_arrays([img])[0]
        assert len(a) == len(b), (path, len(a), len(b))
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        for ma, mb in zip(a.masks, b.masks):
            union = np.logical_or(ma, mb).sum()
            worst = min(worst, float(np.logical_and(ma, mb).sum() / union) if union else 1.0)
    print(f"re-exported {src} -> {dst}; same boxes and scores, worst mask IoU {worst:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
