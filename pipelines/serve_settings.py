"""Settings of the Serve endpoint (``pipelines.serve``), parsed from ``serve run`` / config ``args``.

``serve run pipelines.serve:app model_dir=... max_batch_size=8`` hands the builder every value
as a string; a ``serve deploy`` config's ``args:`` keep their YAML types. :meth:`ServeSettings.from_args`
accepts both, and names the key of any unknown setting or bad value before anything starts.
Importing this module loads no Ray and no Paddle.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from instseg_core.inference.predictor import DEFAULT_MAX_MASK_SIDE
from instseg_core.io import is_remote

# What a replica may ask Ray for; anything else in ray_actor_options is probably a typo.
_ACTOR_OPTION_KEYS = frozenset({"num_cpus", "num_gpus", "memory", "resources", "accelerator_type"})
_NONE_WORDS = frozenset({"", "none", "null"})
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class ServeSettingsError(ValueError):
    """A bad ``args`` entry; the message names the key."""


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """How the endpoint loads the model, batches, limits requests and scales.

    Model: ``model_dir`` (local path or ``s3://`` dir) and/or ``model_name`` (an official name,
    downloaded into the cache when no dir is given). ``device`` defaults to ``gpu`` when the
    replica asks for GPUs, else ``cpu``; ``threshold`` is the default score threshold (else the
    model's ``draw_threshold``); ``cpu_threads`` defaults to the replica's ``num_cpus``.
    """

    model_dir: str | None = None
    model_name: str | None = None
    device: str | None = None
    threshold: float | None = None
    cpu_threads: int | None = None
    max_mask_side: int | None = DEFAULT_MAX_MASK_SIDE
    use_hpip: bool = False  # high-performance mode (instseg_core.inference.hpi)
    hpi_config: dict[str, Any] | None = None  # PaddleX's hpi_config keys (a dict, or its string form)
    # dynamic batching (``@serve.batch``)
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    # requests a replica works on at once (decoding overlaps the running batch); default 2x batch
    max_ongoing_requests: int | None = None
    # requests waiting for a replica beyond that; more get Serve's 503 (-1: no bound)
    max_queued_requests: int = 100
    # limits on what a client can make the replica hold or fetch
    max_pixels: int = 40_000_000
    max_body_bytes: int = 32 * 2**20
    url_allowlist: tuple[str, ...] = ()
    url_timeout_s: float = 10.0
    url_max_bytes: int = 20 * 2**20
    # scaling
    num_replicas: int | None = None
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})
    # PaddleX's serving default: the overlay is returned unless a request says "visualize": false
    visualize: bool = True

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ServeSettings":
        """Build settings from a ``serve run``/config ``args`` dict (strings are converted)."""
        if not isinstance(args, Mapping):
            raise ServeSettingsError(f"serve args must be a mapping of settings, got {type(args).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k) for k in args if k not in known)
        if unknown:
            raise ServeSettingsError(f"unknown serve setting(s): {', '.join(unknown)}; "
                                     f"known settings: {', '.join(sorted(known))}")
        values = {key: _CONVERTERS[key](key, value) for key, value in args.items()}
        if values.get("model_dir") and not is_remote(values["model_dir"]):
            # replicas run in another working directory than the `serve run` that built the app
            values["model_dir"] = os.path.abspath(values["model_dir"])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field checks; raises :class:`ServeSettingsError`."""
        if not self.model_dir and not self.model_name:
            raise ServeSettingsError("give model_dir=<inference dir> or model_name=<official model name>")
        if self.model_dir and not is_remote(self.model_dir) and not os.path.isdir(self.model_dir):
            raise ServeSettingsError(f"model_dir: {self.model_dir} is not a directory")
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ServeSettingsError("give num_replicas or autoscaling_config, not both")
        ongoing = self.ongoing_requests
        if ongoing < self.max_batch_size:
            raise ServeSettingsError(f"max_ongoing_requests ({ongoing}) must be >= max_batch_size "
                                     f"({self.max_batch_size}), else batches never fill")
        if self.autoscaling_config is not None:
            from ray.serve.config import AutoscalingConfig  # Serve's own validation, names the key

            try:
                AutoscalingConfig(**self.autoscaling_config)
            except Exception as e:  # noqa: BLE001 - pydantic/TypeError: report as a settings error
                raise ServeSettingsError(f"autoscaling_config: {e}") from None
        device = self.replica_device
        if device.startswith("gpu") and not self.num_gpus:
            raise ServeSettingsError(f"device={device} needs ray_actor_options num_gpus > 0 (e.g. 0.5)")

    # ------------------------------------------------------------------ derived values

    @property
    def num_gpus(self) -> float:
        return float(self.ray_actor_options.get("num_gpus") or 0)

    @property
    def replica_device(self) -> str:
        """``device``, or ``gpu`` when the replica reserves GPUs, else ``cpu``."""
        return self.device or ("gpu" if self.num_gpus else "cpu")

    @property
    def replica_cpu_threads(self) -> int:
        """Paddle's math threads: ``cpu_threads``, else the replica's whole CPUs (at least 1)."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        return max(1, int(float(self.ray_actor_options.get("num_cpus") or 1)))

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests if self.max_ongoing_requests is not None else 2 * self.max_batch_size

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": dict(self.ray_actor_options),
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


# ---------------------------------------------------------------------- value converters


def _optional(convert):
    def inner(key: str, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        return convert(key, value)
    return inner


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ServeSettingsError(f"{key} must be a non-empty string, got {value!r}")
    return value.strip()


def _int(minimum: int):
    def convert(key: str, value: Any) -> int:
        number: Any = value
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
            raise ServeSettingsError(f"{key} must be an integer >= {minimum}, got {value!r}")
        return number
    return convert


def _float(minimum: float, maximum: float = math.inf, *, strict_min: bool = False):
    def convert(key: str, value: Any) -> float:
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or math.isnan(number):
            number = math.nan
        low_ok = number > minimum if strict_min else number >= minimum
        if not (low_ok and number <= maximum):
            bound = f"> {minimum}" if strict_min else f">= {minimum}"
            upper = f" and <= {maximum}" if maximum != math.inf else ""
            raise ServeSettingsError(f"{key} must be a number {bound}{upper}, got {value!r}")
        return number
    return convert


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ServeSettingsError(f"{key} must be true or false, got {value!r}")


def _mapping(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):  # `serve run ... ray_actor_options='{"num_cpus": 2}'`
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ServeSettingsError(f"{key} must be a mapping (JSON on the command line): {e}") from None
    if not isinstance(value, Mapping):
        raise ServeSettingsError(f"{key} must be a mapping, got {value!r}")
    return {str(k): v for k, v in value.items()}


def _actor_options(key: str, value: Any) -> dict[str, Any]:
    options = _mapping(key, value)
    unknown = sorted(set(options) - _ACTOR_OPTION_KEYS)
    if unknown:
        raise ServeSettingsError(f"{key}: unknown option(s) {', '.join(unknown)}; "
                                 f"allowed: {', '.join(sorted(_ACTOR_OPTION_KEYS))}")
    for name in ("num_cpus", "num_gpus"):
        if name in options:
            options[name] = _float(0.0)(f"{key}.{name}", options[name])
    if "memory" in options:
        options["memory"] = _int(1)(f"{key}.memory", options["memory"])
    return options


def _hosts(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ServeSettingsError(f"{key} must be a list of host names (or a comma-separated string), got {value!r}")
    hosts = []
    for item in items:
        if not isinstance(item, str):
            raise ServeSettingsError(f"{key} entries must be host names, got {item!r}")
        host = item.strip().lower()
        if not host:
            continue
        if "/" in host or "@" in host or " " in host:
            raise ServeSettingsError(f"{key}: {item!r} is not a host name (give hosts like images.example.com "
                                     "or 10.0.0.5:8080, no scheme or path)")
        hosts.append(host)
    return tuple(hosts)


def _device(key: str, value: Any) -> str:
    device = _text(key, value).lower()
    head, _, index = device.partition(":")
    if head not in ("cpu", "gpu") or (index and not index.isdigit()):
        raise ServeSettingsError(f"{key} must be cpu, gpu or gpu:N, got {value!r}")
    return device


def _queue_bound(key: str, value: Any) -> int:
    bound = _int(-1)(key, value)
    if bound == 0:
        raise ServeSettingsError(f"{key} must be -1 (no bound) or a positive integer, got {value!r}")
    return bound


def _max_mask_side(key: str, value: Any) -> int | None:
    return _optional(_int(32))(key, value)


def _hpi_config(key: str, value: Any) -> dict[str, Any] | None:
    """PaddleX's ``hpi_config``: a mapping, or its string form from ``serve run``."""
    from instseg_core.inference.hpi import parse_hpi_config

    if value is None:
        return None
    try:
        cfg = parse_hpi_config(value)
    except ValueError as e:
        raise ServeSettingsError(f"{key}: {e}") from None
    return cfg.as_dict()


_CONVERTERS = {
    "model_dir": _optional(_text),
    "model_name": _optional(_text),
    "device": _optional(_device),
    "threshold": _optional(_float(0.0, 1.0)),
    "cpu_threads": _optional(_int(1)),
    "max_mask_side": _max_mask_side,
    "use_hpip": _bool,
    "hpi_config": _hpi_config,
    "max_batch_size": _int(1),
    "batch_wait_timeout_s": _float(0.0),
    "max_ongoing_requests": _optional(_int(1)),
    "max_queued_requests": _queue_bound,
    "max_pixels": _int(1),
    "max_body_bytes": _int(1),
    "url_allowlist": _hosts,
    "url_timeout_s": _float(0.0, strict_min=True),
    "url_max_bytes": _int(1),
    "num_replicas": _optional(_int(1)),
    "autoscaling_config": _optional(_mapping),
    "ray_actor_options": _actor_options,
    "visualize": _bool,
}
