"""What the entry points share: the prediction flags (one declaration for every job that predicts),
the Ray flags and connection, and the one-line error exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn

from instseg_core.cli import int_or_none
from instseg_core.inference.hpi import BACKENDS, hpi_from_flags
from pipelines.settings import PREDICTION_FIELDS


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """The jobs' log lines: time, level, logger, message, from INFO up."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def fail(message: str) -> NoReturn:
    """A user mistake: one ``error:`` line on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _int_or_none(text: str) -> int | str:
    try:
        value = int_or_none("--max-mask-side", text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return "none" if value is None else value  # None would read as "not given"


def add_prediction_flags(p: argparse.ArgumentParser, threshold_help: str | None = None) -> None:
    """The :class:`~pipelines.settings.PredictionSettings` flags. None of them has an argparse
    default: a flag not given leaves the config's (or YAML's) value alone."""
    p.add_argument("--model", dest="model_name", help="official model name (weights from the model dir cache)")
    p.add_argument("--model-dir", help="inference dir: local, s3:// or http(s)://")
    p.add_argument("--batch-size", type=int, help="images per model call (default 4)")
    p.add_argument("--threshold", type=float, help=threshold_help or "score threshold (default: the model's "
                                                                     "draw_threshold)")
    p.add_argument("--device", help="cpu (default), gpu or gpu:N")
    p.add_argument("--num-actors", type=int, help="fixed actor pool size")
    p.add_argument("--min-actors", type=int, help="autoscaling pool: at least this many actors (default 1)")
    p.add_argument("--max-actors", type=int, help="autoscaling pool: at most this many actors")
    p.add_argument("--num-gpus-per-actor", type=float, help="GPUs per actor, fractional allowed (default 0)")
    p.add_argument("--num-cpus-per-actor", type=float, help="CPUs per actor (default 1)")
    p.add_argument("--cpu-threads", type=int, help="Paddle threads per actor (default: its CPUs)")
    p.add_argument("--hpi", dest="use_hpip", action="store_true", default=None,
                   help="high-performance mode: the fastest backend for the model (OpenVINO / ONNX Runtime on CPU), "
                        "Paddle Inference where none can run it")
    p.add_argument("--hpi-backend", choices=BACKENDS, help="high-performance mode with this backend (implies --hpi)")
    p.add_argument("--hpi-config", help="PaddleX's hpi_config as a dict literal, e.g. \"{'backend': 'openvino', "
                                        "'backend_config': {'cpu_num_threads': 4}}\" (implies --hpi)")
    p.add_argument("--max-pixels", type=int, help="larger images become too_large rows (default 80M)")
    p.add_argument("--max-mask-side", type=_int_or_none, help="longest side at which masks are drawn before "
                                                              "upsampling (default 1333; 'none': full size, as PaddleX)")
    p.add_argument("--actor-memory-gb", type=float, help="memory each actor reserves from Ray and its predictor "
                                                         "may use (default: estimated from the model and batch size)")
    p.add_argument("--predict-timeout-s", type=float, help="per image: a predictor silent longer is restarted")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region")
    p.add_argument("--progress-interval-s", type=float, help="seconds between progress lines (default 10)")


def prediction_values(args: argparse.Namespace) -> dict[str, Any]:
    """The prediction flags that were given, as config keys."""
    values = {k: v for k, v in vars(args).items() if k in PREDICTION_FIELDS and v is not None}
    if values.get("max_mask_side") == "none":
        values["max_mask_side"] = None
    backend = getattr(args, "hpi_backend", None)
    if isinstance(values.get("hpi_config"), str) or backend:
        try:
            values["hpi_config"] = hpi_from_flags(backend, values.get("hpi_config")).as_dict()
        except ValueError as e:
            fail(f"--hpi-config: {e}")
        values["use_hpip"] = True
    return values


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    """Where to run (``--ray-address``, ``--num-cpus``) and ``--debug``."""
    p.add_argument("--ray-address", help="Ray cluster to join (default: the running one, else start a local one; "
                                         "'local' always starts a new local one)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray started by this job (default >= 4)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of setting errors")


def connect_ray(address: str | None, num_cpus: int | None) -> None:
    """Join the given or running cluster (as under `ray job submit`); else start a local Ray with
    at least 4 logical CPUs (some Ray Data operators reserve a CPU and stall on fewer)."""
    import ray

    if ray.is_initialized():
        return
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1))
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return
    try:
        ray.init(address="auto")
    except (ConnectionError, RuntimeError):
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1))
