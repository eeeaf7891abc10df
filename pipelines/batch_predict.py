"""Batch labelling on Ray Data: URIs -> read bytes -> actor pool (decode, predict, RLE) -> Parquet.

A linear chain of stages::

    source (listing or manifest) -> skip images already written (resume)
      -> read bytes (tasks)                      bad reads become error rows, never exceptions
      -> SegmentationActor (actor pool, GPUs)    size check; decode + predict + RLE in its predictor
                                                 process (RowMaker), which an image that exhausts memory,
                                                 crashes or hangs costs only its own row
      -> write parts (tasks)                     one Parquet file per ~rows_per_file rows, atomic
    then, in Ray tasks: de-duplicate, COCO results + COCO dataset (+ LabelMe, Label Studio), the
    review queue (--review-top, pipelines.review); summary.json, report.html (pipelines.report)

Exactly once: a part file is named by the ids it holds and published atomically, a rerun skips
every id already in a part, and a final pass drops any row that a failure made Ray write twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from instseg_core.inference.memory import estimate_predictor_memory
from instseg_core.inference.hpi import parse_hpi_config
from instseg_core.inference.predictor import check_max_mask_side, check_threshold
from instseg_core.inputs import IMAGE_SUFFIXES, InputError, decode_image_bytes, read_bytes
from instseg_core.progress import eta_seconds, format_duration
from instseg_core.io import S3Options, fsspec_fs, is_remote, is_s3, join, redact, storage_error_message
from pipelines.passes import run_pass_in_child
from pipelines.rows import ROW_SCHEMA, error_row, ok_row, rows_to_table
from pipelines.settings import PredictionSettings
from pipelines.shards import Shard, SourceError, expand_shard, input_root, probe_input
from pipelines.sinks import done_ids_of, write_part

log = logging.getLogger("instseg")


class JobSettingsError(ValueError):
    """A setting the job cannot run with (the entry point prints it as one line)."""


@dataclass(kw_only=True)
class BatchPredictConfig(PredictionSettings):
    """Everything a batch-labelling run needs; ``jobs.batch_predict`` fills it from flags or YAML.
    The prediction settings (model, actors, limits) are :class:`PredictionSettings`'s."""

    input: str
    output: str
    rows_per_file: int = 1000
    shard_size: int = 1000  # URIs per input shard: the unit of planning, resume and completion
    shards_per_pass: int = 100  # shards per Ray Dataset execution (see run_batch_predict)
    retry_errors: str = "transient"  # on a rerun, redo error rows: transient kinds, "all" or "none"
    read_batch_size: int = 16
    labelme: bool = False
    label_studio: bool = False  # label_studio/tasks.json (predictions) + config.xml (pipelines.label_studio)
    label_studio_format: str = "brush"  # "brush" (brush RLE masks) or "polygon"
    label_studio_root: str = "/"  # Label Studio's LOCAL_FILES_DOCUMENT_ROOT, for local images
    coco_layout: str = "auto"  # "single" (coco_*.json), "sharded" (coco/*-<k>.json) or "auto" (by size)
    # COCO file_names (and LabelMe paths) are relative to this dir/prefix; default: the input's (a
    # manifest has none: bucket/key). CVAT matches file_name to its task's frame names.
    coco_root: str | None = None
    review_top: int = 0  # review/queue.csv + LabelMe/Label Studio files of the K images to check first
    report: bool = True  # report.html: overlays of a sample, counts, score histogram, errors (pipelines.report)
    run_id: str | None = None
    extensions: tuple[str, ...] = IMAGE_SUFFIXES
    extra: dict[str, Any] = field(default_factory=dict)

    def error_row(self, uri: str, kind: str, message: str) -> dict[str, Any]:
        """The output row of an image that failed, stamped with this run and model."""
        return error_row(uri, kind, message, self.run_id or "", self.model_label)


# ---------------------------------------------------------------- stage 1: read bytes (tasks)

def expand_shards(batch: pa.Table, output: str, s3: S3Options, retry: str) -> Iterator[pa.Table]:
    """Stage 0 (tasks): each shard becomes its URIs, repeats dropped, minus the images its own
    parts already hold (a rerun); columns ``source_uri`` (what to read, credentials included),
    ``uri`` (redacted: what every output shows), ``image_id``, and the shard's id and counts.
    A shard with no URI to label is marked done here (no part will ever speak for it)."""
    from pipelines.sinks import mark_empty_shard

    for shard_json, parts_json in zip(batch.column("shard").to_pylist(), batch.column("parts").to_pylist()):
        shard = Shard(**json.loads(shard_json))
        uris, ids, repeats = expand_shard(shard, s3)
        if not uris:
            mark_empty_shard(output, shard.shard_id, repeats, s3)
        done = done_ids_of(json.loads(parts_json), s3, retry=retry)
        keep = ~np.isin(ids, done) if len(done) else np.ones(len(ids), dtype=bool)
        todo = [u for u, k in zip(uris, keep.tolist()) if k]
        n = len(todo)
        yield pa.table({"source_uri": pa.array(todo, pa.string()),
                        "uri": pa.array([redact(u) for u in todo], pa.string()),
                        "image_id": pa.array(ids[keep], pa.int64()),
                        "shard_id": pa.array([shard.shard_id] * n, pa.string()),
                        "shard_total": pa.array([len(uris)] * n, pa.int64()),
                        "shard_duplicates": pa.array([repeats] * n, pa.int64())})


READ_ATTEMPTS = 4  # a storage read that fails with a transient error is retried this often in all
READ_BACKOFF_S = 0.5  # ... after 0.5 s, 1 s, 2 s (then the image becomes a read_error row)


def _read(uri: str, s3: S3Options) -> bytes:
    """Object bytes; S3 through the job's endpoint/region settings, the rest as the predictor reads.
    A transient failure is retried with exponential backoff; a missing object is not."""
    for attempt in range(READ_ATTEMPTS):
        try:
            if is_s3(uri):
                try:
                    return fsspec_fs(uri, s3).cat_file(uri)
                except FileNotFoundError:
                    raise InputError(f"{redact(uri)} does not exist", "not_found") from None
            return read_bytes(uri)
        except InputError as e:
            if e.kind != "read_error" or attempt == READ_ATTEMPTS - 1:
                raise
        except Exception:  # noqa: BLE001 - storage hiccups (timeouts, 5xx, throttling) are retried
            if attempt == READ_ATTEMPTS - 1:
                raise
        time.sleep(READ_BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


SHARD_COLUMNS = ("image_id", "shard_id", "shard_total", "shard_duplicates")


def read_batch(batch: pa.Table, s3: S3Options) -> pa.Table:
    """Stage 1 (tasks): attach the object's bytes; read errors are kept as data (``read_error``/
    ``read_error_kind``) so one bad object cannot fail the block."""
    data, errors, kinds = [], [], []
    for source_uri, uri in zip(batch.column("source_uri").to_pylist(), batch.column("uri").to_pylist()):
        payload, err, kind = b"", None, None
        try:
            payload = _read(source_uri, s3)
        except InputError as e:
            err, kind = str(e).replace(source_uri, uri), e.kind
        except Exception as e:  # noqa: BLE001 - any storage failure is this image's error, not the job's
            err, kind = f"cannot read {uri}: {type(e).__name__}: {redact(str(e))}", "read_error"
        data.append(payload)
        errors.append(err)
        kinds.append(kind)
    out = batch.select(["uri", *SHARD_COLUMNS])
    return (out.append_column("data", pa.array(data, pa.binary()))
            .append_column("read_error", pa.array(errors, pa.string()))
            .append_column("read_error_kind", pa.array(kinds, pa.string())))


# ---------------------------------------------------------------- stage 2: predict (actor pool)

def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header without decoding the pixels; None if PIL cannot tell."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - the real decoder reports the problem
        return None


class RowMaker:
    """Decode + predict + RLE for batches of ``(uri, bytes)``: what the predictor process runs.

    Built inside the child of :class:`~pipelines.isolated.IsolatedPredictor` (one per actor), so
    dense masks, decoded photos and the graph's buffers live and die there."""

    def __init__(self, cfg: BatchPredictConfig):
        from instseg_core import create_model
        from pipelines.model_source import local_model_dir

        self.cfg = cfg
        device = cfg.device
        if cfg.num_gpus_per_actor > 0 and device.startswith("gpu"):
            device = "gpu:0"  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU
        model_dir = local_model_dir(cfg.model_dir, cfg.s3()) if cfg.model_dir else None
        threads = cfg.cpu_threads or max(1, int(cfg.num_cpus_per_actor))
        self.model = create_model(cfg.model_name, model_dir=model_dir, device=device, threshold=cfg.threshold,
                                  batch_size=cfg.batch_size, cpu_threads=threads, mask_format="rle",
                                  max_mask_side=cfg.max_mask_side, use_hpip=cfg.use_hpip, hpi_config=cfg.hpi_config)
        self.labels = self.model.labels
        log.info("predictor process on %s loaded %s (%s)", socket.gethostname(), cfg.model_label,
                 self.model.engine.backend)

    def __call__(self, items: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        images: list[tuple[str, np.ndarray]] = []
        for uri, data in items:
            try:
                images.append((uri, decode_image_bytes(data, redact(uri))))
            except InputError as e:
                rows.append(self.cfg.error_row(uri, e.kind, str(e)))
            except Exception as e:  # noqa: BLE001
                rows.append(self.cfg.error_row(uri, "corrupt",
                                               f"cannot decode {redact(uri)}: {type(e).__name__}: {e}"))
        del items
        rows.extend(self._predict(images))
        return rows

    def _predict(self, images: list[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
        if not images:
            return []
        run_id, model = self.cfg.run_id or "", self.cfg.model_label
        try:
            results = self.model.predict_arrays([img for _, img in images], rle=True)
            return [ok_row(uri, inst, self.labels, run_id, model) for (uri, _), inst in zip(images, results)]
        except Exception:  # noqa: BLE001 - isolate the image that fails; its neighbours still get labels
            if len(images) == 1:
                uri = images[0][0]
                log.exception("prediction failed for %s", redact(uri))
                import traceback

                cause = traceback.format_exc(limit=1).strip().splitlines()[-1]
                return [self.cfg.error_row(uri, "predict_error", f"prediction failed for {redact(uri)}: {cause}")]
            return [row for item in images for row in self._predict([item])]


def make_row_maker(config: dict[str, Any]) -> RowMaker:
    """Module-level factory the predictor process calls (it is spawned, so it needs a picklable name)."""
    return RowMaker(BatchPredictConfig(**config))


class SegmentationActor:
    """One actor of the pool: checks each image's header (size limit) and read errors, and hands the
    rest to its predictor process (:class:`~pipelines.isolated.IsolatedPredictor`), which loads the
    model once (from a path or URI, never through the object store). An image that exhausts the
    actor's memory, crashes or hangs the predictor becomes an error row; the actor lives on."""

    def __init__(self, config: dict[str, Any]):
        from pipelines.isolated import IsolatedPredictor

        cfg = BatchPredictConfig(**config)
        self.cfg = cfg
        limit = int(cfg.actor_memory_gb * 2**30) if cfg.actor_memory_gb else None
        self.predictor = IsolatedPredictor(make_row_maker, config, cfg.error_row, memory_limit=limit,
                                           timeout_s=cfg.predict_timeout_s * max(1, cfg.batch_size))
        self._reported = (0, 0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        items: list[tuple[str, bytes]] = []
        for rec in batch.to_pylist():
            uri = rec["uri"]
            if rec["read_error"] is not None:
                rows.append(self.cfg.error_row(uri, rec["read_error_kind"] or "read_error", rec["read_error"]))
                continue
            size = _image_size(rec["data"])
            if size and size[0] * size[1] > self.cfg.max_pixels:
                rows.append(self.cfg.error_row(uri, "too_large", f"{redact(uri)} is {size[0]}x{size[1]} pixels, "
                                                                  f"more than max_pixels={self.cfg.max_pixels}"))
                continue
            items.append((uri, rec["data"]))
        # a block of read_batch_size rows per call (Ray Data keeps statistics per output block on
        # the driver: fewer, larger blocks), predicted in model batches of batch_size
        for k in range(0, len(items), self.cfg.batch_size):
            rows.extend(self.predictor(items[k:k + self.cfg.batch_size]))
        table = rows_to_table(rows)
        # each row keeps its shard (rows come back in another order: join on the image id)
        shard_of = {iid: k for k, iid in enumerate(batch.column("image_id").to_pylist())}
        index = pa.array([shard_of[i] for i in table.column("image_id").to_pylist()], pa.int64())
        for name in SHARD_COLUMNS[1:]:
            table = table.append_column(name, batch.column(name).take(index))
        # what this batch cost beyond one plain call, counted once (on the batch's first row)
        stats = self.predictor.stats
        splits, restarts = stats.batch_splits - self._reported[0], stats.child_restarts - self._reported[1]
        self._reported = (stats.batch_splits, stats.child_restarts)
        table = table.append_column("batch_splits", _on_first_row(table.num_rows, splits))
        return table.append_column("predictor_restarts", _on_first_row(table.num_rows, restarts))

    def __del__(self):
        predictor = getattr(self, "predictor", None)
        if predictor is not None:
            predictor.close()


def _on_first_row(num_rows: int, value: int) -> pa.Array:
    """An int32 column holding ``value`` on the first row and 0 on the others."""
    return pa.array([value] + [0] * (num_rows - 1) if num_rows else [], pa.int32())


# ---------------------------------------------------------------- stage 3: write parts (tasks)

def write_batch(batch: pa.Table, output: str, s3: S3Options) -> pa.Table:
    """Stage 3 (tasks): publish the rows as one part file per shard they belong to; pass on only
    what the driver counts."""
    shard_ids = batch.column("shard_id").to_pylist()
    for shard_id in sorted(set(shard_ids)):
        rows = batch.filter(pa.array([s == shard_id for s in shard_ids]))
        write_part(rows.select(ROW_SCHEMA.names), output, s3, shard_id=shard_id,
                   shard_total=int(rows.column("shard_total")[0].as_py()),
                   shard_duplicates=int(rows.column("shard_duplicates")[0].as_py()))
    return batch.select(["status", "error_kind", "num_instances", "batch_splits", "predictor_restarts"])


# ---------------------------------------------------------------- the run

ACTOR_MAX_RESTARTS = 3

def _compute(cfg: BatchPredictConfig):
    import ray

    if cfg.num_actors:
        return ray.data.ActorPoolStrategy(size=cfg.num_actors)
    return ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors or cfg.min_actors)


def build_dataset(cfg: BatchPredictConfig, shards: list[Shard], parts: dict[str, list[str]]):
    """The lazy Ray Dataset of the whole chain over ``shards`` (nothing runs until it is iterated);
    ``parts`` are the part files each shard already has (a rerun)."""
    import ray

    items = [{"shard": json.dumps(asdict(sh)), "parts": json.dumps(parts.get(sh.shard_id, []))} for sh in shards]
    # about 4 shards per expansion task: the driver's blocks stay O(shards), tasks stay short
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), -(-len(items) // 4))))
    ds = ds.map_batches(expand_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                        fn_kwargs={"output": cfg.output, "s3": cfg.s3(), "retry": cfg.retry_errors})
    # small blocks (streaming, not a blocking repartition): a read task's work is bounded, so
    # progress streams and a failure redoes little
    ds = ds.repartition(target_num_rows_per_block=cfg.read_batch_size)
    # Remote reads run as their own light tasks so object-store latency overlaps inference; local
    # reads are cheap and Ray fuses them into the actor (same resource request), saving a copy.
    remote = is_remote(cfg.input)
    ds = ds.map_batches(read_batch, batch_size=cfg.read_batch_size, batch_format="pyarrow",
                        fn_kwargs={"s3": cfg.s3()}, num_cpus=0.25 if remote else 1)
    # Bounded fault tolerance: an actor Ray itself kills (node memory pressure, a lost node) is
    # recreated and its batch retried a few times, then the job fails with the error; Ray Data's
    # defaults (-1, -1) retry forever, which is how a job used to hang in an OOM-restart loop.
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for max_restarts/max_task_retries yet, and deprecates passing
        # them as ray_remote_args: this is still the only way to bound the restarts
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(SegmentationActor, fn_constructor_kwargs={"config": asdict(cfg)},
                            batch_size=max(cfg.read_batch_size, cfg.batch_size), batch_format="pyarrow",
                            compute=_compute(cfg),
                            num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
                            memory=int(cfg.actor_memory_gb * 2**30) if cfg.actor_memory_gb else None,
                            max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_RESTARTS)
    return ds.map_batches(write_batch, batch_size=cfg.rows_per_file, batch_format="pyarrow",
                          fn_kwargs={"output": cfg.output, "s3": cfg.s3()})


def pass_dataset(config: dict[str, Any], shards: list[dict[str, Any]], parts: dict[str, list[str]]):
    """:func:`build_dataset` from plain values: what a pass's own process calls
    (:func:`pipelines.passes.run_pass_in_child`)."""
    config = dict(config, extensions=tuple(config["extensions"]))  # a JSON list on the way
    return build_dataset(BatchPredictConfig(**config), [Shard(**s) for s in shards], parts)


class Progress:
    """Progress lines for logs and `ray job logs`: images done / to do, images/s, errors and an ETA,
    every ``interval_s`` seconds whether or not a part file arrived (a background ticker), so a
    slow model or a long start-up still says what is happening; ``interval_s <= 0`` logs once per
    part file instead. Use as a context manager."""

    def __init__(self, total: int | None, already_done: int, interval_s: float):
        self.total, self.already_done, self.interval_s = total, already_done, interval_s
        self.done = self.errors = self.instances = self.batch_splits = self.predictor_restarts = 0
        self.t0 = time.monotonic()
        self.t_first: float | None = None  # first output: start-up (Ray, actors, model load) is over
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        if self.interval_s > 0:  # 0: a line per part file instead (update logs)
            self._ticker = threading.Thread(target=self._tick, name="instseg-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.log()

    def update(self, summary: pa.Table) -> None:
        if self.t_first is None:
            self.t_first = time.monotonic()
        self.errors += sum(1 for s in summary.column("status").to_pylist() if s != "ok")
        self.instances += int(sum(summary.column("num_instances").to_pylist()))
        splits = int(sum(summary.column("batch_splits").to_pylist()))
        if splits:
            log.warning("degraded: %d batch(es) split after a predictor failure (see error kinds out_of_memory, "
                        "crashed, timeout)", splits)
        self.batch_splits += splits
        self.predictor_restarts += int(sum(summary.column("predictor_restarts").to_pylist()))
        self.done += summary.num_rows  # last: the ticker reads it without a lock
        if self.interval_s <= 0:
            self.log()

    @property
    def todo(self) -> int | None:
        """Images this run has to do, when known (a first run over a listing)."""
        return None if self.total is None else max(self.total - self.already_done, 0)

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.t0, 1e-9)

    @property
    def time_to_first_output(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t0

    def eta_s(self) -> float | None:
        """Seconds left at the rate since the first output (start-up excluded); None before it."""
        if self.t_first is None or self.todo is None:
            return None
        return eta_seconds(self.done, self.todo, time.monotonic() - self.t_first)

    def log(self, prefix: str = "progress") -> None:
        elapsed = format_duration(time.monotonic() - self.t0)
        todo = self.todo
        count = f"{self.done}/{todo}" if todo is not None else f"{self.done}"
        if self.done == 0 and prefix == "progress":
            log.info("%s: %s images this run, %s elapsed: starting actors and loading the model; results arrive "
                     "per part file", prefix, count, elapsed)
            return
        pct = f" ({100.0 * self.done / todo if todo else 100.0:.1f}%)" if todo is not None else ""
        eta = self.eta_s()
        log.info("%s: %s images this run%s, %.2f images/s, %d errors, %s elapsed%s", prefix, count, pct, self.rate,
                 self.errors, elapsed, f", ETA {format_duration(eta)}" if eta is not None and self.done < todo else "")


@dataclass(frozen=True)
class JobPlan:
    """What :func:`check_settings` found before any Ray work: the model and the images."""

    model: Any  # instseg_core.inference.model_dir.ModelDir: labels, model name, draw_threshold


def check_settings(cfg: BatchPredictConfig) -> JobPlan:
    """Check everything that can be checked before any Ray work: numbers in range, the output not
    a file and reachable, the model loadable on this machine, the input listing (or manifest) with
    at least one image. Normalises ``cfg`` in place. Raises :class:`JobSettingsError` with a
    one-line message naming the setting."""
    from pipelines.model_source import validate_model_source

    cfg.absolute_paths("input", "output", "coco_root")
    try:
        if cfg.threshold is not None:
            cfg.threshold = check_threshold(cfg.threshold)
        cfg.max_mask_side = check_max_mask_side(cfg.max_mask_side)
        if cfg.use_hpip:
            parse_hpi_config(cfg.hpi_config)
    except ValueError as e:
        raise JobSettingsError(str(e)) from None
    for name in ("batch_size", "rows_per_file", "shard_size", "shards_per_pass", "read_batch_size", "max_pixels",
                 "min_actors"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise JobSettingsError(f"{name} must be a positive integer, got {value!r}")
    for name in ("num_actors", "max_actors"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise JobSettingsError(f"{name} must be a positive integer, got {value!r}")
    if cfg.predict_timeout_s <= 0 or (cfg.actor_memory_gb is not None and cfg.actor_memory_gb <= 0):
        raise JobSettingsError("predict_timeout_s and actor_memory_gb must be positive")
    if not is_remote(cfg.output) and os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise JobSettingsError(f"output {cfg.output} is a file; give a directory (or an s3:// prefix)")
    s3 = cfg.s3()
    with storage_errors("output", cfg.output):
        fsspec_fs(cfg.output, s3).exists(cfg.output)  # credentials and endpoint work for the output
    with storage_errors("model", cfg.model_dir or ""):
        try:
            model = validate_model_source(cfg.model_name, cfg.model_dir, s3)
        except (ValueError, OSError) as e:  # ModelDirError, a missing/unreadable dir, a failed download
            raise JobSettingsError(f"model: {e}") from None
    if cfg.coco_layout not in ("auto", "single", "sharded"):
        raise JobSettingsError(f"coco_layout must be 'auto', 'single' or 'sharded', got {cfg.coco_layout!r}")
    if isinstance(cfg.review_top, bool) or not isinstance(cfg.review_top, int) or cfg.review_top < 0:
        raise JobSettingsError(f"review_top must be a non-negative integer, got {cfg.review_top!r}")
    if cfg.label_studio or cfg.review_top:  # the review queue has Label Studio tasks too
        _check_label_studio(cfg)
    if cfg.retry_errors not in ("transient", "all", "none"):
        raise JobSettingsError(f"retry_errors must be 'transient', 'all' or 'none', got {cfg.retry_errors!r}")
    with storage_errors("input", cfg.input):
        try:
            probe_input(cfg.input, cfg.extensions, s3)
        except SourceError as e:
            raise JobSettingsError(f"input: {e}") from None
    return JobPlan(model=model)


def _check_label_studio(cfg: BatchPredictConfig) -> None:
    """The Label Studio settings: a known format, and a local input lying below the local files root
    (a local manifest's images are checked when the tasks are written)."""
    from instseg_core.label_studio import KINDS

    if cfg.label_studio_format not in KINDS:
        raise JobSettingsError(f"label_studio_format must be one of {KINDS}, got {cfg.label_studio_format!r}")
    root = input_root(cfg.input)
    if root is not None and not is_remote(root):
        cfg.label_studio_root = os.path.abspath(cfg.label_studio_root)
        if os.path.commonpath([cfg.label_studio_root, root]) != cfg.label_studio_root:
            raise JobSettingsError(f"label_studio_root: the input {root} is not below {cfg.label_studio_root}; "
                                   "Label Studio serves local files only below its LOCAL_FILES_DOCUMENT_ROOT")


@contextmanager
def storage_errors(setting: str, uri: str) -> Iterator[None]:
    """Turn a storage failure a user can fix (no credentials, access denied, ...) into one line."""
    try:
        yield
    except JobSettingsError:
        raise
    except Exception as e:  # noqa: BLE001 - only the storage errors below are translated
        message = storage_error_message(uri, e)
        if message is None:
            raise
        raise JobSettingsError(f"{setting}: {message}") from None


def _largest_node_memory_gb() -> float | None:
    """The most Ray ``memory`` resource any alive node offers (None when Ray does not say)."""
    import ray

    sizes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    return max(sizes) / 2**30 if sizes and max(sizes) > 0 else None


def _size_actors(cfg: BatchPredictConfig) -> None:
    """Set ``cfg.actor_memory_gb`` (the estimate unless given) and say what it means for the
    cluster. A reservation no node can grant would leave the job waiting forever for an actor:
    an explicit one is an error, an estimate is capped to the largest node (images that then do
    not fit become ``out_of_memory`` rows)."""
    node_gb = _largest_node_memory_gb()
    if cfg.actor_memory_gb:
        if node_gb is not None and cfg.actor_memory_gb > node_gb:
            raise JobSettingsError(f"actor_memory_gb={cfg.actor_memory_gb} is more than the largest Ray node offers "
                             f"({node_gb:.1f} GiB): no actor could start")
        log.info("each actor reserves %.2f GiB (actor_memory_gb)", cfg.actor_memory_gb)
        return
    local = cfg.model_dir if cfg.model_dir and not is_remote(cfg.model_dir) else None
    estimate = estimate_predictor_memory(local, cfg.batch_size, cfg.max_mask_side)
    cfg.actor_memory_gb = round(estimate.total / 2**30, 2)
    if node_gb is not None and cfg.actor_memory_gb > 0.9 * node_gb:
        cfg.actor_memory_gb = round(0.9 * node_gb, 2)
        log.warning("the estimate (%s) is more than the largest Ray node offers (%.1f GiB): reserving %.2f GiB; "
                    "lower --batch-size or --max-mask-side to keep large images", estimate.describe(), node_gb,
                    cfg.actor_memory_gb)
    else:
        log.info("each actor reserves %s (batch %d, max_mask_side %s); --actor-memory-gb overrides it",
                 estimate.describe(), cfg.batch_size, cfg.max_mask_side)
    if node_gb is not None:
        log.info("the largest Ray node has %.1f GiB of memory to reserve: %d actor(s) of %.2f GiB fit on it",
                 node_gb, int(node_gb // cfg.actor_memory_gb), cfg.actor_memory_gb)


def _finish_shards(output: str, groups: list[tuple[str, list[str]]], s3: S3Options) -> list[dict[str, Any]]:
    from pipelines.sinks import finish_shard

    return [finish_shard(output, shard_id, parts, s3) for shard_id, parts in groups]


FINISH_TASK_CPUS = 0.25  # finishing a shard is a few small reads and writes


def finish_all(output: str, parts: dict[str, list[str]], s3: S3Options) -> dict[str, Any]:
    """De-duplicate and count every shard that has parts, in Ray tasks (32 shards each, at most
    32 in flight); returns the totals over shards (the driver holds only running sums)."""
    import ray

    from pipelines.sinks import remove_staging_files

    remove_staging_files(output, s3)
    finish = ray.remote(num_cpus=FINISH_TASK_CPUS, max_retries=3)(_finish_shards)
    groups = sorted(parts.items())
    chunks = [groups[i:i + 32] for i in range(0, len(groups), 32)]
    totals: dict[str, Any] = {"images": 0, "images_total": 0, "by_status": Counter(), "errors_by_kind": Counter(),
                              "instances": 0, "duplicates_removed": 0, "source_duplicates": 0,
                              "incomplete_shards": 0, "shards": []}
    pending: list = []
    while chunks or pending:
        while chunks and len(pending) < 32:
            pending.append(finish.remote(output, chunks.pop(), s3))
        ready, pending = ray.wait(pending, num_returns=1)
        for c in ray.get(ready[0]):
            totals["images"] += c["images"]
            totals["images_total"] += c["total"] or 0
            totals["by_status"].update(c["by_status"])
            totals["errors_by_kind"].update(c["errors_by_kind"])
            totals["instances"] += c["instances"]
            totals["duplicates_removed"] += c.get("duplicates_removed", 0)
            totals["source_duplicates"] += c.get("source_duplicates", 0)
            totals["incomplete_shards"] += 0 if c["complete"] else 1
            # what the COCO writers need per shard (kept small: one entry per shard on the driver)
            totals["shards"].append({"shard": c["shard"], "coco_images": c["coco_images"],
                                     "coco_annotations": c["coco_annotations"]})
    totals["by_status"], totals["errors_by_kind"] = dict(totals["by_status"]), dict(totals["errors_by_kind"])
    return totals


def run_batch_predict(cfg: BatchPredictConfig, plan: JobPlan | None = None) -> dict[str, Any]:
    """Run (or resume) a labelling job and write every output; returns the summary dict. ``plan`` is
    :func:`check_settings`'s result when the caller already checked ``cfg`` (else it is checked here)."""
    import ray

    from pipelines.label_studio import LabelStudioOptions
    from pipelines.merge import write_outputs
    from pipelines.shards import load_or_make_plan
    from pipelines.sinks import clear_markers, done_shards, list_parts, parts_by_shard, write_json

    cfg.run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    s3 = cfg.s3()
    plan = plan or check_settings(cfg)
    labels = plan.model.labels
    cfg.model_name = cfg.model_name or plan.model.model_name
    # the threshold the actors apply (the flag, else the model's draw_threshold), for the record
    threshold = cfg.threshold if cfg.threshold is not None else plan.model.draw_threshold
    _size_actors(cfg)
    started = time.time()
    try:
        shards_plan = load_or_make_plan(cfg.input, cfg.output, shard_size=cfg.shard_size,
                                        extensions=cfg.extensions, s3=s3)
    except SourceError as e:
        raise JobSettingsError(f"input: {e}") from None
    finished = done_shards(cfg.output, s3, retry=cfg.retry_errors)
    parts = parts_by_shard(list_parts(cfg.output, s3))
    todo = [sh for sh in shards_plan.shards if sh.shard_id not in finished]
    clear_markers(cfg.output, {sh.shard_id for sh in todo}, s3)  # shards with errors to retry
    fresh = not finished and not parts
    log.info("run %s: %s -> %s with %s (threshold %s, batch %d); %d shard(s), %d finished before%s", cfg.run_id,
             redact(cfg.input), redact(cfg.output), cfg.model_label, threshold, cfg.batch_size,
             len(shards_plan.shards), len(finished),
             f", {shards_plan.listed} image(s) listed" if shards_plan.listed is not None else "")
    # Ray core logs "... has constructor arguments in the object store and max_restarts > 0" at
    # error level for every restartable actor pool: Ray Data keeps the actor's code in the object
    # store, referenced by the driver for the whole run, so a restart finds it (README: Logs)
    log.info("expected: Ray's error-level line about 'constructor arguments in the object store' is harmless "
             "here (see the README, 'Logs')")
    # One Ray Dataset per pass of shards_per_pass shards: Ray Data keeps statistics for every block
    # an operator produced (on the driver, for the whole execution), so one execution over 100M
    # images would grow the driver without bound; passes cap it at one pass's blocks (each pass
    # starts its own actor pool: one model load per actor per pass). With more than one pass, each
    # runs in a process of its own (pipelines.passes): what an execution leaves behind goes with it.
    passes = [todo[i:i + cfg.shards_per_pass] for i in range(0, len(todo), cfg.shards_per_pass)]
    with Progress(shards_plan.listed if fresh else None, 0, cfg.progress_interval_s) as progress:
        for k, shards in enumerate(passes):
            if len(passes) > 1:
                log.info("pass %d/%d: shards %s..%s", k + 1, len(passes), shards[0].shard_id, shards[-1].shard_id)
            if len(passes) == 1:
                batches = build_dataset(cfg, shards, parts).iter_batches(batch_format="pyarrow", batch_size=None)
            else:  # each pass in a driver process of its own: nothing of it stays in this one
                batches = run_pass_in_child("pipelines.batch_predict:pass_dataset", asdict(cfg),
                                            [asdict(sh) for sh in shards],
                                            {sh.shard_id: parts[sh.shard_id] for sh in shards if sh.shard_id in parts})
            for batch_counts in batches:
                progress.update(batch_counts)
    progress.log("predicted")

    parts = parts_by_shard(list_parts(cfg.output, s3))
    for shard_id in done_shards(cfg.output, s3, retry="none"):  # shards without parts (nothing to label)
        parts.setdefault(shard_id, [])
    totals = finish_all(cfg.output, parts, s3)
    merge_started = time.time()
    label_studio = LabelStudioOptions(kind=cfg.label_studio_format, local_files_root=cfg.label_studio_root,
                                      model_version=cfg.run_id) if cfg.label_studio else None
    coco = write_outputs(cfg.output, totals["shards"], parts_by_shard(list_parts(cfg.output, s3)), labels,
                         image_root=cfg.coco_root or input_root(cfg.input), layout=cfg.coco_layout, labelme=cfg.labelme,
                         label_studio=label_studio, s3=s3, review_top=cfg.review_top, threshold=threshold)
    review = None
    if cfg.review_top:
        from pipelines.review import write_review

        review = ray.get(ray.remote(num_cpus=1, max_retries=3)(write_review).remote(
            cfg.output, coco["review"], labels, image_root=cfg.coco_root or input_root(cfg.input),
            label_studio=label_studio or LabelStudioOptions(kind=cfg.label_studio_format,
                                                            local_files_root=cfg.label_studio_root,
                                                            model_version=cfg.run_id), s3=s3))
        log.info("review queue: the %d image(s) to check first in %s", review["images"], review["queue"])
    log.info("wrote COCO (%s) and%s LabelMe files in %.1f s%s", coco["layout"], "" if cfg.labelme else " no",
             time.time() - merge_started,
             f"; Label Studio: {coco['label_studio']['tasks']} task(s) in {', '.join(coco['label_studio']['files'])}"
             if cfg.label_studio else "")
    wall = time.time() - started
    summary = {
        "run_id": cfg.run_id, "model": cfg.model_label, "threshold": threshold, "batch_size": cfg.batch_size,
        "input": redact(cfg.input), "output": redact(cfg.output), "images_total": totals["images_total"],
        "images_this_run": progress.done, "images_before_this_run": totals["images"] - progress.done
        + totals["duplicates_removed"], "duplicates_removed": totals["duplicates_removed"],
        "duplicate_uris_in_input": totals["source_duplicates"], "shards": len(shards_plan.shards),
        "incomplete_shards": totals["incomplete_shards"],
        "images_written": totals["images"], "by_status": totals["by_status"],
        "errors_by_kind": totals["errors_by_kind"], "instances": totals["instances"],
        "retry_errors": cfg.retry_errors,
        "max_mask_side": cfg.max_mask_side, "actor_memory_gb": cfg.actor_memory_gb,
        "use_hpip": cfg.use_hpip, "hpi_config": cfg.hpi_config,
        "batch_splits": progress.batch_splits, "predictor_restarts": progress.predictor_restarts,
        "coco_layout": coco["layout"], "coco_results": coco["results"], "coco_images": coco["images"],
        "coco_annotations": coco["annotations"],
        **({"label_studio_tasks": coco["label_studio"]["tasks"], "label_studio_files": coco["label_studio"]["files"]}
           if cfg.label_studio else {}),
        # the report's numbers (errors_by_kind above is the same count, from the finish step)
        **{k: v for k, v in coco["report"].summary().items() if k != "errors_by_kind"},
        "report": "report.html" if cfg.report else None, "review": review,
        "wall_time_s": round(wall, 2), "images_per_s": round(progress.done / wall, 3) if wall > 0 else None,
        "time_to_first_output_s": None if progress.time_to_first_output is None else round(
            progress.time_to_first_output, 2),
        "ray_version": ray.__version__,
    }
    write_json(join(cfg.output, "summary.json"), summary, s3)
    if cfg.report:
        from pipelines.report import write_report

        # a Ray task: drawing the sample reads and decodes its images, off the driver
        drawn = ray.get(ray.remote(num_cpus=1, max_retries=3)(write_report).remote(
            cfg.output, summary, coco["report"], labels, queue=coco["review"], s3=s3))
        log.info("wrote %s (%d overlays)", drawn["report"], drawn["overlays"])
    log.info("run %s finished: %s", cfg.run_id, {k: summary[k] for k in ("images_written", "by_status",
                                                                           "wall_time_s", "images_per_s")})
    return summary
