"""Helpers shared by the export tests: export a network into a temp dir, read its inference.yml."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def export_to_tmp(tmp_path_factory, model, folder: str, **kwargs: Any) -> tuple[Any, Path]:
    """``(model, inference dir)``: ``model`` exported (its own weights) into a fresh temp folder;
    ``kwargs`` go to :func:`instseg_core.export.export_model`."""
    from instseg_core.export import export_model

    return model, export_model(model, None, tmp_path_factory.mktemp(folder) / "infer", **kwargs)


def read_inference_yml(out: Path, model_name: str, arch: str) -> dict:
    """The ``inference.yml`` of ``out`` after checking what every export shares: the graph files,
    PaddleX's fixed keys, the model name, ``arch`` and the 80 COCO labels."""
    assert (out / "inference.json").is_file() and (out / "inference.pdiparams").is_file()
    cfg = yaml.safe_load((out / "inference.yml").read_text())
    assert cfg["mode"] == "paddle" and cfg["metric"] == "COCO" and cfg["mask"] is True
    assert cfg["Global"]["model_name"] == model_name and cfg["arch"] == arch
    assert len(cfg["label_list"]) == 80 and cfg["label_list"][0] == "person"
    return cfg
