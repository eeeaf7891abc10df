"""``instseg run -c CONFIG -o Global.mode=...``: one function per mode, PaddleX's result files.

``check_dataset`` writes ``<output>/check_dataset_result.json``; on any failure every mode writes
``<output>/<mode>_result.json`` = ``{"done_flag": false, "err_type", "err_msg"}`` and the command
exits with status 1, as PaddleX does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from instseg_core.config import check_config

log = logging.getLogger("instseg")


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return cfg.get(name) or {}


def run_check_dataset(cfg: dict[str, Any]) -> dict[str, Any]:
    """Convert (LabelMe or standard COCO) -> split -> check -> analyse, in PaddleX's order."""
    from instseg_core.datasets.check import check_dataset, summary_lines

    g, cd = _section(cfg, "Global"), _section(cfg, "CheckDataset")
    dataset_dir = g.get("dataset_dir")
    if not dataset_dir:
        raise ValueError("Global.dataset_dir is not set")
    convert = cd.get("convert") or {}
    if convert.get("enable"):
        from instseg_core.datasets.convert import conversion_log_lines, convert_dataset

        for level, line in conversion_log_lines(convert_dataset(dataset_dir, convert.get("src_dataset_type"))):
            log.log(level, "%s", line)
    split = cd.get("split") or {}
    if split.get("enable"):
        from instseg_core.datasets.split import split_coco_dataset

        log.info("re-splitting %s: %s", dataset_dir,
                 split_coco_dataset(dataset_dir, split.get("train_percent"), split.get("val_percent")))
    result = check_dataset(dataset_dir, g.get("output", "output"))
    for line in summary_lines(result):
        (log.info if result.get("check_pass") else log.error)("%s", line)
    return result


def run_predict(cfg: dict[str, Any]) -> None:
    """Predict ``Predict.input`` with ``Predict.model_dir``; print and save every result."""
    from instseg_core.inference.predictor import DEFAULT_MAX_MASK_SIDE, create_model

    g, p = _section(cfg, "Global"), _section(cfg, "Predict")
    device = str(g.get("device") or "cpu").split(",")[0]  # a multi-GPU training device list -> its first GPU
    model = create_model(g["model"], model_dir=p.get("model_dir"), device=device, threshold=p.get("threshold"),
                         max_mask_side=p.get("max_mask_side", DEFAULT_MAX_MASK_SIDE),
                         use_hpip=bool(p.get("use_hpip", False)), hpi_config=p.get("hpi_config"))
    for res in model.predict(p["input"], batch_size=p.get("batch_size", 1), threshold=p.get("threshold")):
        res.print()
        res.save_all(g.get("output", "output"))


def run_train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train on ``Global.dataset_dir``; PaddleX's outputs in ``Global.output`` (see training.engine)."""
    from instseg_core.training.engine import train

    return train(cfg)


def _weights_and_classes(model_name: str, weight_path: Any, section: str, fallback: int) -> tuple[dict, int]:
    from instseg_core.modeling.build import num_classes_in_weights
    from instseg_core.modeling.weights import read_pdparams

    if not weight_path:
        raise ValueError(f"{section}.weight_path is not set (a .pdparams path, URL or s3:// URI)")
    weights = read_pdparams(str(weight_path))
    return weights, num_classes_in_weights(model_name, weights) or fallback


def run_evaluate(cfg: dict[str, Any]) -> dict[str, Any]:
    """COCO mask/box AP of ``Evaluate.weight_path`` on the dataset's val split ->
    ``<output>/evaluate_result.json`` = ``{"done_flag": true, "metrics": {"AP": mask AP, ...}}``.

    Test-time inputs: the training recipe's square resize for the trainable families
    (PP-YOLOE_seg, Mask-RT-DETR; ``Train.input_size`` or the recipe's size); for the others (R-CNN,
    SOLOv2) the model's ``inference.yml`` preprocessing, run as the exported predictor runs it
    (keep-ratio resize to [800, 1333], normalise, pad to a stride). ``Evaluate.input_size`` (a
    multiple of 32) overrides the size: the square side, or the short side of a keep-ratio
    [s, 5s/3] target as ``Export.input_size`` writes it (e.g. a quick evaluation at 320)."""
    from instseg_core.datasets.coco import annotation_path, find_dataset_root
    from instseg_core.modeling import build_model
    from instseg_core.modeling.weights import load_weights
    from instseg_core.training.data import CocoInstanceDataset
    from instseg_core.training.evaluator import evaluate_model
    from instseg_core.training.recipes import evaluation_inputs, recipe_for
    from instseg_core.training.remote import localize_dataset

    g, t, e = _section(cfg, "Global"), _section(cfg, "Train"), _section(cfg, "Evaluate")
    if not g.get("dataset_dir"):
        raise ValueError("Global.dataset_dir is not set")
    input_size = e.get("input_size")
    if input_size is not None:
        # the sizes an exported graph accepts (a stride-32 network), so evaluate == export at that size
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32 or input_size % 32:
            raise ValueError(f"Evaluate.input_size must be a positive multiple of 32, got {input_size!r}")
    root = find_dataset_root(localize_dataset(str(g["dataset_dir"])))
    val = CocoInstanceDataset(annotation_path(root, "val"), root / "images")
    weights, num_classes = _weights_and_classes(g["model"], e.get("weight_path"), "Evaluate", val.num_classes)
    if num_classes != val.num_classes:
        raise ValueError(f"{e['weight_path']} predicts {num_classes} classes but the val split has "
                         f"{val.num_classes} categories")
    import paddle

    paddle.set_device(str(g.get("device") or "cpu").split(",")[0])
    model = build_model(g["model"], num_classes=num_classes, **dict(t.get("arch") or {}))
    load_weights(model, weights)
    # as validated during training: square resize (DETR/YOLOE), the exported keep-ratio
    # preprocessing (R-CNN/SOLOv2)
    stats = evaluate_model(model, val, **evaluation_inputs(g["model"], recipe_for(g["model"], t), input_size))
    metrics = {"AP": stats["segm"]["AP"], "segm": stats["segm"], "bbox": stats["bbox"]}
    record = {"done_flag": True, "metrics": metrics}
    out = Path(g.get("output", "output"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate_result.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("mask AP %.4f, box AP %.4f", stats["segm"]["AP"], stats["bbox"]["AP"])
    return record


def run_export(cfg: dict[str, Any]) -> Path:
    """Export ``Export.weight_path`` as an inference dir written directly in ``Global.output``
    (as PaddleX does). Labels come from the dataset when ``Global.dataset_dir`` has one, else
    from the official list (COCO-80) or ``class<i>`` names."""
    from instseg_core.export import DEFAULT_SCORE_FLOOR, export_model
    from instseg_core.training.recipes import recipe_for

    g, t, x = _section(cfg, "Global"), _section(cfg, "Train"), _section(cfg, "Export")
    weights, num_classes = _weights_and_classes(g["model"], x.get("weight_path"), "Export",
                                                int(t.get("num_classes") or 80))
    labels = _dataset_labels(g.get("dataset_dir"), num_classes)
    # default: the trained size (square side; R-CNN/SOLOv2: keep-ratio short side, official 800)
    input_size = int(x.get("input_size") or recipe_for(g["model"], t).input_size)
    # Export.score_floor: None (YAML null) keeps every detection the model's own rule keeps (see export_model)
    floor = x.get("score_floor", DEFAULT_SCORE_FLOOR)
    return export_model(g["model"], weights, g.get("output", "output"), input_size=input_size,
                        labels=labels, num_classes=num_classes, arch=dict(t.get("arch") or {}),
                        score_floor=None if floor is None else float(floor), strict=bool(x.get("strict", True)))


def _dataset_labels(dataset_dir: Any, num_classes: int) -> list[str] | None:
    """Category names of the dataset (sorted by id) if it is there and has ``num_classes`` of them."""
    if not dataset_dir:
        return None
    from instseg_core.datasets.coco import annotation_path, find_dataset_root

    try:
        root = find_dataset_root(str(dataset_dir))
        coco = json.loads(annotation_path(root, "train").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - no usable dataset: fall back to default names
        return None
    names = [c.get("name", str(c["id"])) for c in sorted(coco.get("categories", []), key=lambda c: c["id"])]
    return names if len(names) == num_classes else None


MODE_RUNNERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "check_dataset": run_check_dataset,
    "predict": run_predict,
    "train": run_train,
    "evaluate": run_evaluate,
    "export": run_export,
}


def run_config(cfg: dict[str, Any]) -> int:
    """Run the config's mode; returns the process exit status (0 ok, 1 failed: an error, or a dataset that
    fails its check)."""
    check_config(cfg)
    g = cfg["Global"]
    mode, output = g["mode"], Path(g.get("output", "output"))
    try:
        result = MODE_RUNNERS[mode](cfg)
        # a dataset that fails its check is a failed run (the result file says why, as PaddleX's)
        return 1 if isinstance(result, dict) and result.get("check_pass") is False else 0
    except Exception as e:  # noqa: BLE001 - every failure becomes PaddleX's error record
        log.error("%s failed: %s: %s", mode, type(e).__name__, e)
        output.mkdir(parents=True, exist_ok=True)
        record = {"done_flag": False, "err_type": str(type(e)), "err_msg": str(e)}
        (output / f"{mode}_result.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        return 1
