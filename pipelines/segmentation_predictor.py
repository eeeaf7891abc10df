"""``SegmentationPredictor``: the model as a Ray Data callable class, for users' own pipelines.

::

    ds = ray.data.read_images("s3://bucket/images/", include_paths=True)
    ds = ds.map_batches(SegmentationPredictor, fn_constructor_kwargs={"model_dir": "s3://bucket/model"},
                        batch_size=4, compute=ray.data.ActorPoolStrategy(size=4))
    ds.write_parquet("s3://bucket/labels/")

Each actor loads the model once (its constructor) and turns every batch into rows of the batch
job's schema (:data:`pipelines.rows.ROW_SCHEMA`, one row per image, masks as COCO RLE), so the
Parquet it writes reads like ``jobs.batch_predict``'s parts. Two batch layouts are accepted:

* ``read_images``: an ``image`` column (RGB, or grey / RGBA, decoded by Ray) and ``path``
  (``include_paths=True``; without it a row has no URI and the batch is refused);
* ``read_binary_files``: a ``bytes`` column (encoded images, decoded here as the batch job
  decodes them) and ``path`` or ``uri``.

An image that cannot be decoded or predicted becomes an error row (``status="error"``), never a
failed task. Unlike the batch job, the model runs in the actor's own process (no predictor child,
no memory or time limit per image) and there is no resume or de-duplication: that is the job's.

URIs: Ray Data gives local paths as they were written and S3 objects as ``bucket/key``. A
relative local path is made absolute (the batch job's URIs are absolute, and ``image_id`` is a
hash of the URI); ``uri_prefix="s3://"`` restores the scheme of S3 paths.
"""
from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from instseg_core.inference.predictor import DEFAULT_MAX_MASK_SIDE
from instseg_core.inputs import InputError, decode_image_bytes
from instseg_core.io import S3Options, is_remote, redact
from pipelines.model_source import local_model_dir
from pipelines.rows import error_row, ok_row, rows_to_table
from pipelines.settings import PredictionSettings

log = logging.getLogger("instseg")

__all__ = ["SegmentationPredictor"]


class SegmentationPredictor:
    """A Ray Data callable class: a batch of images in, a ``pyarrow.Table`` of batch-job rows out.

    Args:
        model_dir: a PaddleX-format inference dir, local or on S3 (copied once per node).
        model_name: one of the official names (downloaded once per node when ``model_dir`` is
            None; checked against the dir's ``inference.yml`` when both are given).
        threshold: score threshold (default: the model's ``draw_threshold``).
        device: ``cpu``, ``gpu`` or ``gpu:N``; default: the GPU Ray gave this actor
            (``map_batches(..., num_gpus=1)``), else CPU.
        cpu_threads: Paddle's CPU threads; default: the CPUs Ray reserved for the actor (at least 1).
        batch_size: images per model call (a Ray batch larger than this is split).
        use_hpip, hpi_config: high-performance mode, as in ``create_model``.
        max_mask_side: masks drawn at most this large, then upsampled (None: full size).
        run_id: the rows' ``run_id`` (the batch job's run id; default empty).
        uri_prefix: prepended to every path (``"s3://"`` for images read from S3).
        s3_endpoint, s3_region: for a ``model_dir`` on S3 (default: the AWS environment).
    """

    def __init__(self, model_dir: str | None = None, model_name: str | None = None, *,
                 threshold: float | None = None, device: str | None = None, cpu_threads: int | None = None,
                 batch_size: int = 4, use_hpip: bool = False, hpi_config: dict[str, Any] | str | None = None,
                 max_mask_side: int | None = DEFAULT_MAX_MASK_SIDE, run_id: str = "", uri_prefix: str = "",
                 s3_endpoint: str | None = None, s3_region: str | None = None) -> None:
        from instseg_core import create_model

        if model_dir is None and model_name is None:
            raise ValueError("SegmentationPredictor needs model_dir or model_name")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        local_dir = local_model_dir(model_dir, S3Options.from_env(s3_endpoint, s3_region)) if model_dir else None
        device = device or _ray_device()
        self.model = create_model(model_name, model_dir=local_dir, device=device, threshold=threshold,
                                  batch_size=batch_size, cpu_threads=cpu_threads or _ray_cpus(),
                                  mask_format="rle", max_mask_side=max_mask_side, use_hpip=use_hpip,
                                  hpi_config=hpi_config)
        self.labels = self.model.labels
        self.batch_size, self.run_id, self.uri_prefix = batch_size, run_id, uri_prefix
        # the batch job's "model" column: the name, else the dir's base name
        self.model_label = PredictionSettings(model_name=model_name, model_dir=model_dir).model_label
        log.info("SegmentationPredictor loaded %s on %s (%s)", self.model_label, device, self.model.engine.backend)

    def __call__(self, batch: Mapping[str, Any] | pa.Table | Any) -> pa.Table:
        """Rows (:data:`~pipelines.rows.ROW_SCHEMA`) for the batch's images, in batch order.
        ``batch``: any of Ray Data's batch formats (numpy dict, the default; pandas; pyarrow)."""
        columns = _columns(batch)
        uris = self._uris(columns)
        rows: list[dict[str, Any] | None] = [None] * len(uris)
        decoded: list[tuple[int, np.ndarray]] = []
        for i, uri in enumerate(uris):
            try:
                decoded.append((i, _image(columns, i, uri)))
            except InputError as e:
                rows[i] = self._error(uri, e.kind, str(e))
            except Exception as e:  # noqa: BLE001 - one bad image is its own row, not a failed task
                rows[i] = self._error(uri, "corrupt", f"cannot decode {redact(uri)}: {type(e).__name__}: {e}")
        for k in range(0, len(decoded), self.batch_size):
            chunk = decoded[k:k + self.batch_size]
            for (i, _), row in zip(chunk, self._predict([(uris[i], img) for i, img in chunk])):
                rows[i] = row
        return rows_to_table(rows)  # type: ignore[arg-type]

    def _uris(self, columns: Mapping[str, Any]) -> list[str]:
        key = "path" if "path" in columns else "uri" if "uri" in columns else None
        if key is None:
            raise ValueError(f"SegmentationPredictor needs a 'path' or 'uri' column (read_images(..., "
                             f"include_paths=True)); the batch has {sorted(columns)}")
        out = []
        for p in columns[key]:
            p = str(p)
            if not self.uri_prefix and not is_remote(p) and not os.path.isabs(p) and os.path.exists(p):
                p = os.path.abspath(p)  # resolved where Ray read it: this process's directory
            out.append(self.uri_prefix + p)
        return out

    def _predict(self, images: Sequence[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
        """Rows for ``(uri, bgr)`` pairs; a failing batch is retried image by image, so only the
        image that fails becomes an error row."""
        if not images:
            return []
        try:
            results = self.model.predict_arrays([img for _, img in images], rle=True)
            return [ok_row(uri, inst, self.labels, self.run_id, self.model_label)
                    for (uri, _), inst in zip(images, results)]
        except Exception:  # noqa: BLE001
            if len(images) > 1:
                return [row for item in images for row in self._predict([item])]
            uri = images[0][0]
            log.exception("prediction failed for %s", redact(uri))
            cause = traceback.format_exc(limit=1).strip().splitlines()[-1]
            return [self._error(uri, "predict_error", f"prediction failed for {redact(uri)}: {cause}")]

    def _error(self, uri: str, kind: str, message: str) -> dict[str, Any]:
        return error_row(uri, kind, message, self.run_id, self.model_label)


def _columns(batch: Any) -> Mapping[str, Any]:
    """A column mapping from any of Ray Data's batch formats (numpy dict, pandas, pyarrow)."""
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, pa.Table):
        batch = batch.to_pandas()
    if hasattr(batch, "columns") and hasattr(batch, "__getitem__"):  # pandas.DataFrame
        return {str(c): batch[c].to_numpy() for c in batch.columns}
    raise TypeError(f"SegmentationPredictor: unsupported batch type {type(batch).__name__}")


def _image(columns: Mapping[str, Any], i: int, uri: str) -> np.ndarray:
    """Row ``i``'s image as the model wants it: BGR, 3 channels, uint8."""
    import cv2

    if "image" in columns:
        img = np.asarray(columns["image"][i])
        if img.dtype != np.uint8:
            raise InputError(f"{redact(uri)}: image of dtype {img.dtype}, expected uint8", "unsupported")
        if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
            return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
        if img.ndim == 3 and img.shape[2] == 3:
            return np.ascontiguousarray(img[:, :, ::-1])  # Ray decodes to RGB
        if img.ndim == 3 and img.shape[2] == 4:
            return cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
        raise InputError(f"{redact(uri)}: image of shape {img.shape}, expected HxW, HxWx3 or HxWx4", "unsupported")
    if "bytes" in columns:
        return decode_image_bytes(bytes(columns["bytes"][i]), redact(uri))
    raise ValueError(f"SegmentationPredictor needs an 'image' (read_images) or 'bytes' (read_binary_files) "
                     f"column; the batch has {sorted(columns)}")


def _ray_device() -> str:
    """``gpu:0`` when Ray gave this actor a GPU (Ray narrows CUDA_VISIBLE_DEVICES to it), else ``cpu``."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_accelerator_ids().get("GPU"):
            return "gpu:0"
    except Exception:  # noqa: BLE001 - outside Ray: CPU
        pass
    return "cpu"


def _ray_cpus() -> int | None:
    """The CPUs Ray reserved for this actor, at least 1 (Paddle would otherwise start a thread per
    core of the node); None outside Ray (create_model's default)."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001
        pass
    return None
