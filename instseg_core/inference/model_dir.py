"""Find, validate and (for official names) download a PaddleX-format inference dir.

A model dir holds ``inference.json`` (PIR graph; preferred) or ``inference.pdmodel``, plus
``inference.pdiparams`` and ``inference.yml``. Every problem is reported with the path and the fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from instseg_core.families import ARCHS
from instseg_core.inference.preprocess import Preprocessor
from instseg_core.models import MODEL_SPECS, get_spec

log = logging.getLogger("instseg")

GRAPH_FILES = ("inference.json", "inference.pdmodel")
PARAMS_FILE = "inference.pdiparams"
CONFIG_FILE = "inference.yml"


class ModelDirError(ValueError):
    """A model dir that is missing, incomplete or does not match the requested model."""


@dataclass
class ModelDir:
    """A validated inference dir and what its ``inference.yml`` says."""

    path: Path
    model_file: Path
    params_file: Path
    config: dict[str, Any]
    model_name: str | None
    arch: str
    labels: list[str]
    draw_threshold: float
    preprocess: list[dict[str, Any]]

    @property
    def is_solov2(self) -> bool:
        return self.arch == "SOLOv2"


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ModelDirError(f"{cfg_path} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelDirError(f"{cfg_path} should hold a mapping, got {type(cfg).__name__}")
    return cfg


def load_model_dir(path: str | Path, model_name: str | None = None) -> ModelDir:
    """Validate ``path`` as an inference dir, optionally for the official ``model_name``.

    Raises:
        ModelDirError: missing dir/files, bad YAML, ``Global.model_name`` mismatch, unknown arch,
            unknown preprocess op, missing labels.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelDirError(f"model dir {path} does not exist or is not a directory")
    graph = next((path / g for g in GRAPH_FILES if (path / g).is_file()), None)
    missing = [n for n, ok in ((" or ".join(GRAPH_FILES), graph is not None),
                               (PARAMS_FILE, (path / PARAMS_FILE).is_file()),
                               (CONFIG_FILE, (path / CONFIG_FILE).is_file())) if not ok]
    if missing:
        raise ModelDirError(f"model dir {path} is incomplete: missing {', '.join(missing)}")
    cfg = _read_config(path)
    cfg_path = path / CONFIG_FILE

    declared = (cfg.get("Global") or {}).get("model_name")
    if model_name is not None and declared is not None and declared != model_name:
        raise ModelDirError(f"model name mismatch: {cfg_path} declares Global.model_name={declared!r} "
                            f"but {model_name!r} was requested; pass the matching name or model dir")
    name = model_name or declared
    spec = MODEL_SPECS.get(name) if name else None

    arch = cfg.get("arch") or (spec.arch if spec else None)
    if arch not in ARCHS:
        raise ModelDirError(f"{cfg_path}: unknown or missing arch {arch!r}; expected one of {sorted(ARCHS)}")

    labels = cfg.get("label_list")
    if labels is None:
        if spec is None:
            raise ModelDirError(f"{cfg_path} has no label_list and {name!r} is not an official model name")
        labels = list(spec.labels)
    if "draw_threshold" in cfg:
        draw_threshold = float(cfg["draw_threshold"])
    else:
        draw_threshold = spec.draw_threshold if spec else 0.5
        log.warning("%s has no draw_threshold; using %.2f", cfg_path, draw_threshold)

    preprocess = cfg.get("Preprocess")
    if not isinstance(preprocess, list) or not preprocess:
        raise ModelDirError(f"{cfg_path} has no Preprocess list")
    Preprocessor(preprocess, source=str(cfg_path))  # validates op names and arguments now, not at the first image

    return ModelDir(path=path, model_file=graph, params_file=path / PARAMS_FILE, config=cfg, model_name=name,
                    arch=arch, labels=[str(x) for x in labels], draw_threshold=draw_threshold,
                    preprocess=preprocess)


def resolve_model_dir(model_name: str | None, model_dir: str | Path | None = None) -> ModelDir:
    """The model dir to run: ``model_dir`` if given, else the official model, downloaded and cached
    under ``$INSTSEG_HOME`` (default ``~/.cache/instseg``). ``$INSTSEG_MODEL_BASE_URL`` replaces the
    official host and folder (a mirror or an internal artifact store serving ``<name>_infer.tar``)."""
    if model_dir is not None:
        return load_model_dir(model_dir, model_name)
    if model_name is None:
        raise ModelDirError("give a model_name (one of the 15 official names) or a model_dir")
    spec = get_spec(model_name)
    from instseg_core.inference.download import fetch_official_model

    base = os.environ.get("INSTSEG_MODEL_BASE_URL")
    url = f"{base.rstrip('/')}/{spec.name}_infer.tar" if base else spec.inference_url
    local = fetch_official_model(spec.name, url)
    return load_model_dir(local, spec.name)
