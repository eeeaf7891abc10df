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
    """Convert (LabelMe) -> split -> check -> analyse, in PaddleX's order."""
    from instseg_core.datasets.check import check_dataset

    g, cd = _section(cfg, "Global"), _section(cfg, "CheckDataset")
    dataset_dir = g.get("dataset_dir")
    if not dataset_dir:
        raise ValueError("Global.dataset_dir is not set")
    convert = cd.get("convert") or {}
    if convert.get("enable"):
        src_type = convert.get("src_dataset_type")
        if src_type != "LabelMe":
            raise ValueError(f"CheckDataset.convert.src_dataset_type must be LabelMe (the only convertible "
                             f"format), got {src_type!r}")
        from instseg_core.datasets.labelme import convert_labelme_to_coco

        log.info("converting LabelMe annotations in %s: %s", dataset_dir, convert_labelme_to_coco(dataset_dir))
    split = cd.get("split") or {}
    if split.get("enable"):
        from instseg_core.datasets.split import split_coco_dataset

        log.info("re-splitting %s: %s", dataset_dir,
                 split_coco_dataset(dataset_dir, split.get("train_percent"), split.get("val_percent")))
    return check_dataset(dataset_dir, g.get("output", "output"))


def run_predict(cfg: dict[str, Any]) -> None:
    """Predict ``Predict.input`` with ``Predict.model_dir``; print and save every result."""
    from instseg_core.inference.predictor import create_model

    g, p = _section(cfg, "Global"), _section(cfg, "Predict")
    device = str(g.get("device") or "cpu").split(",")[0]  # a multi-GPU training device list -> its first GPU
    model = create_model(g["model"], model_dir=p.get("model_dir"), device=device, threshold=p.get("threshold"))
    for res in model.predict(p["input"], batch_size=p.get("batch_size", 1), threshold=p.get("threshold")):
        res.print()
        res.save_all(g.get("output", "output"))


def _not_yet(mode: str) -> Callable[[dict[str, Any]], Any]:
    def run(_: dict[str, Any]) -> Any:
        raise NotImplementedError(f"Global.mode={mode} is not available yet in this version of instseg "
                                  "(training, evaluation and export land with the training engine)")

    return run


MODE_RUNNERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "check_dataset": run_check_dataset,
    "predict": run_predict,
    "train": _not_yet("train"),
    "evaluate": _not_yet("evaluate"),
    "export": _not_yet("export"),
}


def run_config(cfg: dict[str, Any]) -> int:
    """Run the config's mode; returns the process exit status (0 ok, 1 failed)."""
    check_config(cfg)
    g = cfg["Global"]
    mode, output = g["mode"], Path(g.get("output", "output"))
    try:
        MODE_RUNNERS[mode](cfg)
        return 0
    except Exception as e:  # noqa: BLE001 - every failure becomes PaddleX's error record
        log.error("%s failed: %s: %s", mode, type(e).__name__, e)
        output.mkdir(parents=True, exist_ok=True)
        record = {"done_flag": False, "err_type": str(type(e)), "err_msg": str(e)}
        (output / f"{mode}_result.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        return 1
