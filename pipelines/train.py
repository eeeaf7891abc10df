"""Data-parallel Paddle training on a Ray cluster: a Paddle backend for Ray Train (V2).

Ray Train has no Paddle integration, so this module supplies one:

* :class:`PaddleBackendConfig` / :class:`PaddleBackend`: when Ray Train starts a worker group it
  picks a free port on rank 0 (the TCPStore master) and one endpoint per worker, and sets the
  variables ``paddle.distributed.init_parallel_env`` reads on each worker (``PADDLE_TRAINER_ID``,
  ``PADDLE_TRAINERS_NUM``, ``PADDLE_TRAINER_ENDPOINTS``, ``PADDLE_CURRENT_ENDPOINT``,
  ``PADDLE_MASTER``, ``MASTER_ADDR``/``MASTER_PORT``, ``PADDLE_DISTRI_BACKEND``,
  ``PADDLE_PG_TIMEOUT``, and ``FLAGS_selected_gpus`` on GPU workers). The process group itself is
  created by the training loop (:func:`init_paddle_distributed`), in the thread that trains.
* Worker-side helpers for a training loop: :func:`init_paddle_distributed`, :func:`shard_indices`,
  :func:`report_checkpoint`, :func:`latest_checkpoint_dir`, :func:`all_reduce_mean`.
* :func:`train_on_ray`: runs a loop on ``num_workers`` workers with checkpoints on local/shared
  disk or S3, and restarts the whole group from the last checkpoint after a worker failure.

A training loop looks like this (every rank runs it)::

    def loop(config):
        rank, world = init_paddle_distributed()          # process group when world > 1
        model = build_model()
        opt = paddle.optimizer.AdamW(parameters=model.parameters())
        start_epoch = 0
        ckpt = latest_checkpoint_dir()                   # set after a restart / re-run
        if ckpt:
            model.set_state_dict(paddle.load(f"{ckpt}/model.pdparams"))
            opt.set_state_dict(paddle.load(f"{ckpt}/model.pdopt"))
            start_epoch = json.load(open(f"{ckpt}/state.json"))["epoch"] + 1
        dp = paddle.DataParallel(model) if world > 1 else model
        for epoch in range(start_epoch, config["epochs"]):
            for i in shard_indices(len(dataset), rank, world, seed=0, epoch=epoch): ...
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    paddle.save(model.state_dict(), f"{d}/model.pdparams")
                    ...
                report_checkpoint({"epoch": epoch, "loss": all_reduce_mean(loss)}, d)

Fault tolerance: with ``max_failures=N`` a dead worker (crash, OOM kill, lost node) makes Ray
Train stop the whole group and start a new one, up to N times; in the new group
``ray.train.get_checkpoint()`` (and so :func:`latest_checkpoint_dir`) is the last checkpoint
reported. Running ``train_on_ray`` again with the same ``name`` and ``storage_path`` also resumes
from the last checkpoint of that run (Ray Train V2 restores its checkpoint manager from storage).

``storage_path`` must be reachable from every node: a shared file system or ``s3://`` (S3
credentials come from each node's environment/instance role; the endpoint and region are taken
from the driver's ``AWS_ENDPOINT_URL(_S3)``/``AWS_REGION`` as :class:`instseg_core.io.S3Options` reads them).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.backend import Backend, BackendConfig

from instseg_core.io import S3Options, fsspec_fs, is_remote, redact
from instseg_core.training.engine import epoch_order
from pipelines.storage import arrow_fs

log = logging.getLogger("instseg")

__all__ = [
    "PaddleBackendConfig",
    "PaddleBackend",
    "init_paddle_distributed",
    "shard_indices",
    "report_checkpoint",
    "latest_checkpoint_dir",
    "all_reduce_mean",
    "train_on_ray",
]

_BACKENDS = ("auto", "gloo", "nccl")


# --------------------------------------------------------------------------------------------
# Ray side: the backend
# --------------------------------------------------------------------------------------------


@dataclass
class PaddleBackendConfig(BackendConfig):
    """How the Paddle process group is set up on the Ray Train workers.

    Attributes:
        backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA) or ``"auto"``: nccl when the workers have
            GPUs (``ScalingConfig(use_gpu=True)``), gloo otherwise.
        timeout_s: timeout of collective operations (Paddle's ``PADDLE_PG_TIMEOUT``).
    """

    backend: str = "auto"
    timeout_s: int = 1800

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")

    @property
    def backend_cls(self):
        return PaddleBackend

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


def _address_and_port() -> tuple[str, int]:
    """This worker's node IP and a currently free TCP port on it."""
    import socket

    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        return addr, s.getsockname()[1]


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _gpu_indices(assigned: list[str], cuda_visible_devices: str) -> list[int]:
    """Indices, within ``CUDA_VISIBLE_DEVICES``, of the GPU ids Ray assigned to this worker.

    Ray Train shares ``CUDA_VISIBLE_DEVICES`` among the workers of a node (so NCCL can use
    P2P/NVLink between them); each worker then selects its own GPU(s) by index.
    """
    visible = [v.strip() for v in cuda_visible_devices.split(",") if v.strip()]
    if not visible:  # nothing narrowed: the physical ids are the indices
        return [int(g) for g in assigned]
    return [visible.index(g) if g in visible else i for i, g in enumerate(assigned)]


def _local_gpu_ids() -> list[int]:
    assigned = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    return _gpu_indices(assigned, os.environ.get("CUDA_VISIBLE_DEVICES", "")) if assigned else []


def _set_paddle_env(rank: int, world: int, master: str, endpoints: list[str], backend: str,
                    timeout_s: int) -> None:
    """Runs on each worker before the training loop: the variables init_parallel_env reads."""
    master_addr, _, master_port = master.rpartition(":")
    env = {
        "PADDLE_TRAINER_ID": str(rank),
        "PADDLE_TRAINERS_NUM": str(world),
        "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
        "PADDLE_CURRENT_ENDPOINT": endpoints[rank],
        "PADDLE_MASTER": master,
        "MASTER_ADDR": master_addr.strip("[]"),
        "MASTER_PORT": master_port,
        "PADDLE_DISTRI_BACKEND": backend,
        "PADDLE_PG_TIMEOUT": str(int(timeout_s * 1000)),
    }
    os.environ.update(env)
    if backend == "nccl":
        gpus = _local_gpu_ids()
        if not gpus:
            raise RuntimeError("backend 'nccl' but Ray assigned no GPU to this worker "
                               "(use ScalingConfig(use_gpu=True) or backend='gloo')")
        os.environ["FLAGS_selected_gpus"] = ",".join(str(g) for g in gpus)
    else:
        os.environ.pop("FLAGS_selected_gpus", None)


def _shutdown_paddle() -> None:
    """Best effort: forget the default process group (Ray kills the worker processes next)."""
    global _DIST
    try:
        import paddle.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - shutdown must not fail the run
        log.debug("paddle process group shutdown: %s", e)
    _DIST = None


class PaddleBackend(Backend):
    """Sets up Paddle's collective environment on a Ray Train worker group.

    ``on_start`` runs on the driver-side controller after the workers start (and again after each
    restart, with fresh ports): rank 0's node address and a free port become the TCPStore master;
    every worker gets its own ``addr:port`` endpoint. Creating the process group is left to the
    loop (:func:`init_paddle_distributed`) because Paddle keeps it per process and the loop
    decides whether (world size 1) and when to create it.
    """

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: PaddleBackendConfig) -> None:
        world = len(worker_group)
        backend = backend_config.backend
        if backend == "auto":
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        master_addr, master_port = worker_group.execute_single(0, _address_and_port)
        addrs = worker_group.execute(_address_and_port)
        endpoints = []
        for rank, (addr, port) in enumerate(addrs):
            while (addr, port) == (master_addr, master_port):  # never reuse the master's port
                addr, port = worker_group.execute_single(rank, _address_and_port)
            endpoints.append(_endpoint(addr, port))
        master = _endpoint(master_addr, master_port)
        log.info("paddle backend %s: world=%d master=%s", backend, world, master)
        ray.get([worker_group.execute_single_async(rank, _set_paddle_env, rank, world, master, endpoints,
                                                   backend, backend_config.timeout_s)
                 for rank in range(world)])

    def on_shutdown(self, worker_group, backend_config: PaddleBackendConfig) -> None:
        if len(worker_group) < 2:
            return
        try:
            ray.get(worker_group.execute_async(_shutdown_paddle), timeout=30)
        except ray.exceptions.GetTimeoutError:
            log.warning("paddle process group shutdown timed out")


# --------------------------------------------------------------------------------------------
# Worker side: helpers for the training loop
# --------------------------------------------------------------------------------------------

_DIST: tuple[int, int] | None = None


def _rank_world() -> tuple[int, int]:
    if "PADDLE_TRAINERS_NUM" in os.environ:
        return int(os.environ.get("PADDLE_TRAINER_ID", "0")), int(os.environ["PADDLE_TRAINERS_NUM"])
    try:
        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # noqa: BLE001 - outside Ray Train
        return 0, 1


def init_paddle_distributed() -> tuple[int, int]:
    """Prepare Paddle on this worker; returns ``(rank, world_size)``.

    Selects the device (``gpu:<id>`` from ``FLAGS_selected_gpus`` under nccl, ``cpu`` under gloo)
    and, when the world has more than one worker, creates the default process group with
    ``paddle.distributed.init_parallel_env`` (blocks until every rank has joined). With one
    worker, or outside Ray Train, no process group is created and ``(0, 1)`` comes back, so the
    same loop also runs in a plain process. Calling it again is a no-op.
    """
    global _DIST
    if _DIST is not None:
        return _DIST
    import paddle

    rank, world = _rank_world()
    backend = os.environ.get("PADDLE_DISTRI_BACKEND")
    gpus = os.environ.get("FLAGS_selected_gpus")
    if backend == "nccl" and gpus:
        paddle.set_device(f"gpu:{gpus.split(',')[0]}")
    elif backend == "gloo":
        paddle.set_device("cpu")
    if world > 1:
        import paddle.distributed as dist

        dist.init_parallel_env()
    _DIST = (rank, world)
    return _DIST


def shard_indices(n: int, rank: int, world: int, seed: int = 0, epoch: int = 0, *,
                  shuffle: bool = True) -> np.ndarray:
    """This rank's sample indices for one epoch (int64 array).

    All ranks compute the same permutation of ``range(n)`` from ``(seed, epoch)`` (a new order
    every epoch, the same on every call), pad it to a multiple of ``world`` by wrapping around to
    its start, and take every ``world``-th element from position ``rank``. So every shard has
    ``ceil(n / world)`` indices (equal step counts on every rank, which collective training
    needs), the shards are disjoint when ``world`` divides ``n``, and otherwise the first
    ``world * ceil(n / world) - n`` indices of the permutation are seen twice in that epoch; every
    sample is seen at least once per epoch. ``shuffle=False`` keeps ``0..n-1`` in order.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank/world: {rank}/{world}")
    if not shuffle:
        return np.resize(np.arange(n), -(-n // world) * world)[rank::world].astype(np.int64) if n > 0 \
            else np.zeros(0, dtype=np.int64)
    # the training engine's order, so Ray-sharded and single-process runs see the same epochs
    return np.asarray(epoch_order(n, seed=int(seed), epoch=int(epoch), rank=rank, world_size=world), np.int64)


def report_checkpoint(metrics: dict[str, Any], checkpoint_dir: str | os.PathLike | None = None, *,
                      wait: bool = False) -> None:
    """Report this epoch's metrics, and on rank 0 a checkpoint, to Ray Train.

    Every rank must call it the same number of times (Ray Train synchronises the reports).
    Rank 0 attaches ``checkpoint_dir`` when given (it is copied to the run's storage before this
    returns, so a temporary directory may be deleted afterwards); other ranks report the metrics
    only, whatever they pass. Metrics must be plain Python numbers/strings (use ``.item()``).

    Ray Train registers a reported checkpoint when its controller next polls the workers (every
    2 s by default); a worker group that dies before that restarts from the previous checkpoint.
    ``wait=True`` blocks until the controller has registered this report, so a crash any time
    after this call resumes from it (worth it when epochs are short, or before a risky step).
    """
    rank = ray.train.get_context().get_world_rank()
    if rank == 0 and checkpoint_dir is not None:
        ray.train.report(dict(metrics), checkpoint=Checkpoint.from_directory(os.fspath(checkpoint_dir)))
    else:
        ray.train.report(dict(metrics))
    if wait:
        ray.train.get_all_reported_checkpoints()


def latest_checkpoint_dir() -> str | None:
    """A local directory with the latest reported checkpoint of this run, or None at a fresh start.

    On local/shared storage it is the checkpoint's own directory (read it, don't write to it); on
    S3 the checkpoint is downloaded into a new temporary directory.
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    import pyarrow.fs as pafs

    if isinstance(ckpt.filesystem, pafs.LocalFileSystem) and os.path.isdir(ckpt.path):
        return ckpt.path
    return ckpt.to_directory()


def all_reduce_mean(value: float) -> float:
    """The mean of a Python number over all ranks (the value itself when world size is 1).

    Call it on every rank (it is a collective), after :func:`init_paddle_distributed`.
    """
    rank_world = _DIST or _rank_world()
    if rank_world[1] < 2:
        return float(value)
    import paddle
    import paddle.distributed as dist

    t = paddle.to_tensor([float(value)], dtype="float64")
    dist.all_reduce(t)
    return float(t.numpy()[0]) / rank_world[1]


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def _storage(storage_path: str) -> tuple[str, Any]:
    """(path, filesystem) for RunConfig: a pyarrow filesystem for URIs, the absolute path otherwise."""
    if is_remote(storage_path):
        fs, path = arrow_fs(storage_path, S3Options.from_env())
        return path, fs
    return os.path.abspath(storage_path.removeprefix("file://")), None


def train_on_ray(train_loop_per_worker: Callable[[dict], Any], loop_config: dict, *, num_workers: int,
                 use_gpu: bool = False, cpus_per_worker: float = 1, storage_path: str, name: str,
                 max_failures: int = 0, num_to_keep: int | None = None,
                 backend_config: PaddleBackendConfig | None = None) -> Result:
    """Run ``train_loop_per_worker(loop_config)`` on ``num_workers`` Ray Train workers.

    Args:
        train_loop_per_worker: the loop every worker runs (see the module docstring); it must be
            importable or picklable on the workers.
        loop_config: passed to the loop (must pickle).
        num_workers: data-parallel workers (the world size).
        use_gpu: one GPU per worker (nccl backend unless ``backend_config`` says otherwise).
        cpus_per_worker: CPUs reserved per worker.
        storage_path: where checkpoints and run state go: a local or shared path, or
            ``s3://bucket/prefix`` (endpoint/region from ``AWS_ENDPOINT_URL(_S3)``/``AWS_REGION``).
            It must be reachable from every node.
        name: run name; the run lives under ``storage_path/name``, and a second call with the
            same name and storage resumes from that run's last checkpoint.
        max_failures: how many times the worker group may fail and be restarted from the last
            checkpoint (0: the first failure ends the run with ``TrainingFailedError``).
        num_to_keep: keep only the most recent N checkpoints (None: keep all).
        backend_config: backend choice and collective timeout (default: auto, 1800 s).

    Returns:
        The ``ray.train.Result``: ``metrics`` (rank 0's last report), ``checkpoint`` (the last
        checkpoint), ``path``/``filesystem`` of the run.
    """
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    if num_workers < 1:
        raise ValueError("num_workers must be >= 1")
    path, fs = _storage(storage_path)
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    run_config = RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
    )
    trainer = DataParallelTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        backend_config=backend_config or PaddleBackendConfig(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config,
    )
    log.info("training %r on %d worker(s) (gpu=%s), storage %s", name, num_workers, use_gpu,
             redact(storage_path))
    return trainer.fit()


# --------------------------------------------------------------------------------------------
# The instseg training engine on Ray Train
# --------------------------------------------------------------------------------------------


def _engine_loop(config: dict) -> None:
    """Every worker: join the process group, resume from Ray's latest checkpoint, run the engine,
    report each epoch (rank 0 with its checkpoint dir); rank 0 uploads ``Global.output`` at the end."""
    from instseg_core.training.engine import train

    rank, world = init_paddle_distributed()
    cfg = config["cfg"]
    resume = latest_checkpoint_dir()
    # from remote storage the checkpoint is a downloaded copy (a temporary directory): delete it after
    downloaded = resume is not None and resume != ray.train.get_checkpoint().path

    def on_epoch_end(epoch: int, metrics: dict[str, Any], ckpt_dir) -> None:
        report_checkpoint({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, ckpt_dir)

    try:
        train(cfg, rank=rank, world_size=world, on_epoch_end=on_epoch_end, resume_path=resume)
    finally:
        if downloaded:
            shutil.rmtree(resume, ignore_errors=True)
    upload = config.get("upload_output_to")
    if rank == 0 and upload:
        out = str((cfg.get("Global") or {}).get("output", "output"))
        fsspec_fs(upload, S3Options.from_env()).put(out.rstrip("/") + "/", upload.rstrip("/") + "/", recursive=True)


def fine_tune_on_ray(cfg: dict, *, num_workers: int, use_gpu: bool = False, cpus_per_worker: float = 1,
                     storage_path: str, name: str, max_failures: int = 0) -> Result:
    """Run ``Global.mode=train`` of the module config ``cfg`` on ``num_workers`` Ray Train workers.

    The same config drives a single-process run; here every epoch's images are sharded across
    workers (``Train.batch_size`` is per worker), gradients are averaged by ``paddle.DataParallel``,
    rank 0 evaluates, writes PaddleX's outputs into ``Global.output`` on its node and reports
    each evaluated epoch's checkpoint to ``storage_path/name``. After a worker failure the group
    restarts from that checkpoint (up to ``max_failures`` times). With remote storage, rank 0
    also copies ``Global.output`` to ``storage_path/name/output`` at the end.
    """
    upload = f"{storage_path.rstrip('/')}/{name}/output" if is_remote(storage_path) else None
    return train_on_ray(_engine_loop, {"cfg": cfg, "upload_output_to": upload}, num_workers=num_workers,
                        use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, storage_path=storage_path,
                        name=name, max_failures=max_failures)
