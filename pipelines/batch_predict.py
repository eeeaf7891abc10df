"""Batch labelling on Ray Data: URIs -> read bytes -> actor pool (decode, predict, RLE) -> Parquet.

A linear chain of stages::

    source (listing or manifest) -> skip images already written (resume)
      -> read bytes (tasks)                      bad reads become error rows, never exceptions
      -> SegmentationActor (actor pool, GPUs)    size check; decode + predict + RLE in its predictor
                                                 process (RowMaker), which an image that exhausts memory,
                                                 crashes or hangs costs only its own row
      -> write parts (tasks)                     one Parquet file per ~rows_per_file rows, atomic
    then, on the driver: de-duplicate, COCO results + COCO dataset (+ LabelMe), summary.json

Exactly once: a part file is named by the ids it holds and published atomically, a rerun skips
every id already in a part, and a final pass drops any row that a failure made Ray write twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from instseg_core.inference.memory import estimate_predictor_memory
from instseg_core.inference.predictor import DEFAULT_MAX_MASK_SIDE, check_max_mask_side, check_threshold
from instseg_core.inputs import IMAGE_SUFFIXES, InputError, decode_image_bytes, read_bytes
from instseg_core.progress import eta_seconds, format_duration
from pipelines.rows import ROW_SCHEMA, error_row, image_id_for, ok_row, rows_to_table
from pipelines.sinks import done_image_ids, write_part
from pipelines.sources import Source, SourceError, input_root, resolve_source
from pipelines.storage import S3Options, fsspec_fs, is_remote, is_s3, redact, storage_error_message

log = logging.getLogger("instseg")


class JobSettingsError(ValueError):
    """A setting the job cannot run with (the entry point prints it as one line)."""


@dataclass
class BatchPredictConfig:
    """Everything a batch-labelling run needs; ``jobs.batch_predict`` fills it from flags or YAML."""

    input: str
    output: str
    model_name: str | None = None
    model_dir: str | None = None
    batch_size: int = 4
    threshold: float | None = None
    device: str = "cpu"
    num_actors: int | None = None  # fixed pool size; else min_actors..max_actors (autoscaling)
    min_actors: int = 1
    max_actors: int | None = None
    num_gpus_per_actor: float = 0.0  # fractional: two actors can share a GPU and overlap CPU work
    num_cpus_per_actor: float = 1.0
    cpu_threads: int | None = None  # Paddle threads per actor (default: num_cpus_per_actor)
    rows_per_file: int = 1000
    read_batch_size: int = 16
    max_pixels: int = 80_000_000  # larger images become error rows instead of exhausting memory
    max_mask_side: int | None = DEFAULT_MAX_MASK_SIDE  # masks drawn at most this large, then upsampled
    actor_memory_gb: float | None = None  # memory each actor reserves and its predictor may use (None: estimate)
    predict_timeout_s: float = 600.0  # per image of a batch: a predictor silent for longer is restarted
    labelme: bool = False
    s3_endpoint: str | None = None
    s3_region: str | None = None
    run_id: str | None = None
    progress_interval_s: float = 10.0
    extensions: tuple[str, ...] = IMAGE_SUFFIXES
    extra: dict[str, Any] = field(default_factory=dict)

    def s3(self) -> S3Options:
        return S3Options.from_env(self.s3_endpoint, self.s3_region)

    def error_row(self, uri: str, kind: str, message: str) -> dict[str, Any]:
        """The output row of an image that failed, stamped with this run and model."""
        return error_row(uri, kind, message, self.run_id or "", self.model_label)

    @property
    def model_label(self) -> str:
        return self.model_name or os.path.basename(str(self.model_dir).rstrip("/"))


# ---------------------------------------------------------------- stage 1: read bytes (tasks)

def _read(uri: str, s3: S3Options) -> bytes:
    """Object bytes; S3 through the job's endpoint/region settings, the rest as the predictor reads."""
    if is_s3(uri):
        try:
            return fsspec_fs(uri, s3).cat_file(uri)
        except FileNotFoundError:
            raise InputError(f"{redact(uri)} does not exist", "not_found") from None
    return read_bytes(uri)


def read_batch(batch: pa.Table, done_ids: np.ndarray, s3: S3Options) -> pa.Table:
    """Attach ``image_id`` and the object's bytes; skip ids already written; read errors are kept
    as data (``read_error``/``read_error_kind``) so one bad object cannot fail the block."""
    uris = batch.column("uri").to_pylist()
    ids = np.array([image_id_for(u) for u in uris], dtype=np.int64)
    if len(done_ids):
        pos = np.searchsorted(done_ids, ids).clip(max=len(done_ids) - 1)
        keep = done_ids[pos] != ids
    else:
        keep = np.ones(len(ids), dtype=bool)
    out: dict[str, list] = {"uri": [], "image_id": [], "data": [], "read_error": [], "read_error_kind": []}
    for uri, iid, k in zip(uris, ids.tolist(), keep.tolist()):
        if not k:
            continue
        data, err, kind = b"", None, None
        try:
            data = _read(uri, s3)
        except InputError as e:
            err, kind = str(e), e.kind
        except Exception as e:  # noqa: BLE001 - any storage failure is this image's error, not the job's
            err, kind = f"cannot read {redact(uri)}: {type(e).__name__}: {e}", "read_error"
        out["uri"].append(uri)
        out["image_id"].append(iid)
        out["data"].append(data)
        out["read_error"].append(err)
        out["read_error_kind"].append(kind)
    return pa.table({"uri": pa.array(out["uri"], pa.string()), "image_id": pa.array(out["image_id"], pa.int64()),
                     "data": pa.array(out["data"], pa.binary()),
                     "read_error": pa.array(out["read_error"], pa.string()),
                     "read_error_kind": pa.array(out["read_error_kind"], pa.string())})


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
                                  max_mask_side=cfg.max_mask_side)
        self.labels = self.model.labels
        log.info("predictor process on %s loaded %s", socket.gethostname(), cfg.model_label)

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
        rows.extend(self.predictor(items))
        table = rows_to_table(rows)
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
    """Publish the rows as one part file; pass on only what the driver counts."""
    if batch.num_rows:
        write_part(batch.select(ROW_SCHEMA.names), output, s3)
    return batch.select(["status", "error_kind", "num_instances", "batch_splits", "predictor_restarts"])


# ---------------------------------------------------------------- the run

ACTOR_MAX_RESTARTS = 3

def _compute(cfg: BatchPredictConfig):
    import ray

    if cfg.num_actors:
        return ray.data.ActorPoolStrategy(size=cfg.num_actors)
    return ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors or cfg.min_actors)


def build_dataset(cfg: BatchPredictConfig, src: Source, done_ids: np.ndarray):
    """The lazy Ray Dataset of the whole chain (nothing runs until it is iterated)."""
    import ray

    from pipelines.storage import arrow_fs

    if src.parquet_manifest is not None:
        fs, path = arrow_fs(src.parquet_manifest, cfg.s3())
        ds = ray.data.read_parquet(path, filesystem=fs, columns=[src.uri_column])
        if src.uri_column != "uri":
            ds = ds.rename_columns({src.uri_column: "uri"})
        total = ds.count()  # from Parquet metadata: no data read
        # small blocks: a task's work is bounded, so progress streams and a failure redoes little
        ds = ds.repartition(num_blocks=max(1, -(-total // cfg.read_batch_size)))
    else:
        total = len(src.uris)
        table = pa.table({"uri": src.uris})
        ds = ray.data.from_arrow([table.slice(i, cfg.read_batch_size)
                                  for i in range(0, max(total, 1), cfg.read_batch_size)])
    # Remote reads run as their own light tasks so object-store latency overlaps inference; local
    # reads are cheap and Ray fuses them into the actor (same resource request), saving a copy.
    remote = src.parquet_manifest is not None or any(is_remote(u) for u in src.uris.to_pylist()[:1])
    ds = ds.map_batches(read_batch, batch_size=cfg.read_batch_size, batch_format="pyarrow",
                        fn_kwargs={"done_ids": done_ids, "s3": cfg.s3()}, num_cpus=0.25 if remote else 1)
    # Bounded fault tolerance: an actor Ray itself kills (node memory pressure, a lost node) is
    # recreated and its batch retried a few times, then the job fails with the error; Ray Data's
    # defaults (-1, -1) retry forever, which is how a job used to hang in an OOM-restart loop.
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for max_restarts/max_task_retries yet, and deprecates passing
        # them as ray_remote_args: this is still the only way to bound the restarts
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(SegmentationActor, fn_constructor_kwargs={"config": asdict(cfg)},
                            batch_size=cfg.batch_size, batch_format="pyarrow", compute=_compute(cfg),
                            num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
                            memory=int(cfg.actor_memory_gb * 2**30) if cfg.actor_memory_gb else None,
                            max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_RESTARTS)
    ds = ds.map_batches(write_batch, batch_size=cfg.rows_per_file, batch_format="pyarrow",
                        fn_kwargs={"output": cfg.output, "s3": cfg.s3()})
    return ds, total


class Progress:
    """Progress lines for logs and `ray job logs`: images done / to do, images/s, errors and an ETA,
    every ``interval_s`` seconds whether or not a part file arrived (a background ticker), so a
    slow model or a long start-up still says what is happening; ``interval_s <= 0`` logs once per
    part file instead. Use as a context manager."""

    def __init__(self, total: int, already_done: int, interval_s: float):
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
    def todo(self) -> int:
        return max(self.total - self.already_done, 0)

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.t0, 1e-9)

    @property
    def time_to_first_output(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t0

    def eta_s(self) -> float | None:
        """Seconds left at the rate since the first output (start-up excluded); None before it."""
        return None if self.t_first is None else eta_seconds(self.done, self.todo, time.monotonic() - self.t_first)

    def log(self, prefix: str = "progress") -> None:
        elapsed = format_duration(time.monotonic() - self.t0)
        if self.done == 0 and prefix == "progress":
            log.info("%s: 0/%d images this run (%d done before), %s elapsed: starting actors and loading the "
                     "model; results arrive per part file", prefix, self.todo, self.already_done, elapsed)
            return
        eta = self.eta_s()
        pct = 100.0 * self.done / self.todo if self.todo else 100.0
        log.info("%s: %d/%d images this run (%.1f%%, %d done before), %.2f images/s, %d errors, %s elapsed%s",
                 prefix, self.done, self.todo, pct, self.already_done, self.rate, self.errors, elapsed,
                 f", ETA {format_duration(eta)}" if eta is not None and self.done < self.todo else "")


@dataclass(frozen=True)
class JobPlan:
    """What :func:`check_settings` found before any Ray work: the model and the images."""

    model: Any  # instseg_core.inference.model_dir.ModelDir: labels, model name, draw_threshold
    source: Source


def check_settings(cfg: BatchPredictConfig) -> JobPlan:
    """Check everything that can be checked before any Ray work: numbers in range, the output not
    a file and reachable, the model loadable on this machine, the input listing (or manifest) with
    at least one image. Normalises ``cfg`` in place. Raises :class:`JobSettingsError` with a
    one-line message naming the setting."""
    from pipelines.model_source import validate_model_source

    try:
        if cfg.threshold is not None:
            cfg.threshold = check_threshold(cfg.threshold)
        cfg.max_mask_side = check_max_mask_side(cfg.max_mask_side)
    except ValueError as e:
        raise JobSettingsError(str(e)) from None
    for name in ("batch_size", "rows_per_file", "read_batch_size", "max_pixels", "min_actors"):
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
    with storage_errors("input", cfg.input):
        try:
            source = resolve_source(cfg.input, cfg.extensions, s3)
        except SourceError as e:
            raise JobSettingsError(f"input: {e}") from None
    return JobPlan(model=model, source=source)


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


def run_batch_predict(cfg: BatchPredictConfig, plan: JobPlan | None = None) -> dict[str, Any]:
    """Run (or resume) a labelling job and write every output; returns the summary dict. ``plan`` is
    :func:`check_settings`'s result when the caller already checked ``cfg`` (else it is checked here)."""
    import ray

    from pipelines.exports import write_coco_dataset, write_coco_results, write_labelme, iter_rows
    from pipelines.sinks import deduplicate_parts, list_parts, remove_staging_files, summarize, write_json
    from pipelines.storage import join

    cfg.run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    s3 = cfg.s3()
    plan = plan or check_settings(cfg)
    labels = plan.model.labels
    cfg.model_name = cfg.model_name or plan.model.model_name
    # the threshold the actors apply (the flag, else the model's draw_threshold), for the record
    threshold = cfg.threshold if cfg.threshold is not None else plan.model.draw_threshold
    _size_actors(cfg)
    started = time.time()
    done_ids = done_image_ids(cfg.output, s3)
    log.info("run %s: %s -> %s with %s (threshold %s, batch %d); %d image(s) already written", cfg.run_id,
             redact(cfg.input), redact(cfg.output), cfg.model_label, threshold, cfg.batch_size, len(done_ids))
    ds, total = build_dataset(cfg, plan.source, done_ids)
    # Ray core logs "... has constructor arguments in the object store and max_restarts > 0" at
    # error level for every restartable actor pool: Ray Data keeps the actor's code in the object
    # store, referenced by the driver for the whole run, so a restart finds it (README: Logs)
    log.info("expected: Ray's error-level line about 'constructor arguments in the object store' is harmless "
             "here (see the README, 'Logs')")
    with Progress(total, len(done_ids), cfg.progress_interval_s) as progress:
        for summary in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            progress.update(summary)
    progress.log("predicted")

    remove_staging_files(cfg.output, s3)
    dropped = deduplicate_parts(cfg.output, s3)
    parts = list_parts(cfg.output, s3)
    n_results = write_coco_results(iter_rows(parts), join(cfg.output, "coco_results.json"), labels)
    counts = write_coco_dataset(iter_rows(parts), join(cfg.output, "coco_dataset.json"), labels,
                                image_root=input_root(cfg.input))
    if cfg.labelme:
        write_labelme(iter_rows(parts), join(cfg.output, "labelme"))
    totals = summarize(cfg.output, s3)
    wall = time.time() - started
    summary = {
        "run_id": cfg.run_id, "model": cfg.model_label, "threshold": threshold, "batch_size": cfg.batch_size,
        "input": redact(cfg.input), "output": redact(cfg.output), "images_total": total,
        "images_this_run": progress.done, "images_before_this_run": len(done_ids), "duplicates_removed": dropped,
        "images_written": totals["images"], "by_status": totals["by_status"],
        "errors_by_kind": totals["errors_by_kind"], "instances": totals["instances"],
        "max_mask_side": cfg.max_mask_side, "actor_memory_gb": cfg.actor_memory_gb,
        "batch_splits": progress.batch_splits, "predictor_restarts": progress.predictor_restarts,
        "coco_results": n_results, "coco_images": counts["images"], "coco_annotations": counts["annotations"],
        "wall_time_s": round(wall, 2), "images_per_s": round(progress.done / wall, 3) if wall > 0 else None,
        "time_to_first_output_s": None if progress.time_to_first_output is None else round(
            progress.time_to_first_output, 2),
        "ray_version": ray.__version__,
    }
    write_json(join(cfg.output, "summary.json"), summary, s3)
    log.info("run %s finished: %s", cfg.run_id, {k: summary[k] for k in ("images_written", "by_status",
                                                                           "wall_time_s", "images_per_s")})
    return summary
