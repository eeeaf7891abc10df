"""Module YAML configs (PaddleX layout) and ``-o Key.sub=value`` overrides.

Sections: ``Global`` (model, mode, dataset_dir, device, output), ``CheckDataset`` (convert, split),
``Train``, ``Evaluate``, ``Export``, ``Predict``. One file per model in ``instseg_core/configs/``.

Override values are parsed as PaddleX does (None, booleans, Python literals, else the string) but
safely and without its bug: PaddleX tests ``value in ("None")``, a substring test on the string
"None", so ``-o Global.device=n`` or ``-o X=o`` becomes None; here only ``None``/``none``/``null``
(and ``~``) do. Literals go through ``ast.literal_eval``, never ``eval``.
"""

from __future__ import annotations

import ast
import copy
import logging
from pathlib import Path
from typing import Any, Sequence

import yaml

log = logging.getLogger("instseg")

CONFIG_DIR = Path(__file__).parent / "configs"
MODES = ("check_dataset", "train", "evaluate", "export", "predict")
_NONE = {"None", "none", "null", "Null", "NULL", "~"}
_TRUE = {"TRUE", "True", "true", "T", "t"}
_FALSE = {"FALSE", "False", "false", "F", "f"}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which and why."""


def parse_value(text: str) -> Any:
    """An override's value: None, bool, a Python literal (number, list, dict, quoted string) or the string."""
    s = text.strip()
    if s in _NONE:
        return None
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return s  # e.g. gpu:0,1 or a path


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"Train.learning_rate=1e-4"`` -> (["Train", "learning_rate"], 0.0001). Values may contain '='."""
    if "=" not in item:
        raise ConfigError(f"malformed override {item!r}: expected Key.sub=value")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"malformed override {item!r}: bad key {key!r}")
    return parts, parse_value(value)


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``config`` with the overrides applied; new keys are created with a warning."""
    cfg = copy.deepcopy(config)
    for item in overrides:
        keys, value = parse_override(item)
        node = cfg
        for i, k in enumerate(keys[:-1]):
            if k not in node:
                log.warning("override %s: new section %s", item, ".".join(keys[: i + 1]))
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
            node = node[k]
        if keys[-1] not in node:
            log.warning("override %s: unknown key %s (added)", item, ".".join(keys))
        node[keys[-1]] = value
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a module YAML; a model name instead of a path loads the packaged config of that model."""
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        p = CONFIG_DIR / f"{path}.yaml"
    try:
        with open(p, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config {path} not found (a path, or one of the 15 model names)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict) or "Global" not in cfg:
        raise ConfigError(f"config {p} has no Global section")
    return _literal_strings(cfg)


def _literal_strings(node: Any) -> Any:
    """As PaddleX, string values that are Python literals become them (YAML reads ``1e-4`` as a string)."""
    if isinstance(node, dict):
        return {k: _literal_strings(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_literal_strings(v) for v in node]
    if isinstance(node, str):
        try:
            value = ast.literal_eval(node)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return node
        return value if isinstance(value, (int, float, list, dict, tuple, bool)) else node
    return node


def check_config(cfg: dict[str, Any]) -> None:
    """Fail early on a config that cannot run."""
    g = cfg.get("Global") or {}
    if g.get("mode") not in MODES:
        raise ConfigError(f"Global.mode must be one of {MODES}, got {g.get('mode')!r}")
    if not g.get("model"):
        raise ConfigError("Global.model is missing")
