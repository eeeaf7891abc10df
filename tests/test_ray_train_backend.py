"""The Paddle backend for Ray Train (pipelines/train.py) on a real local Ray cluster.

A toy linear regression trained data-parallel on gloo (2 CPU workers), with checkpoints on local
disk and on loopback S3, one worker killed mid-epoch to exercise restart-from-checkpoint, and a
single worker (no process group).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import paddle
import pytest

ray = pytest.importorskip("ray")

from instseg_core.modeling.losses.distributed import mean_over_ranks  # noqa: E402
from pipelines.train import (  # noqa: E402
    PaddleBackendConfig,
    _gpu_indices,
    _set_paddle_env,
    all_reduce_mean,
    init_paddle_distributed,
    latest_checkpoint_dir,
    report_checkpoint,
    shard_indices,
    train_on_ray,
)

# the loop functions below run on Ray workers, which cannot import this test module: ship them by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_SAMPLES, DIM, BATCH = 64, 4, 8
_PADDLE_ENV = ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT",
               "PADDLE_MASTER", "MASTER_ADDR", "MASTER_PORT", "PADDLE_DISTRI_BACKEND", "PADDLE_PG_TIMEOUT",
               "FLAGS_selected_gpus")
TRUE_W = np.array([1.5, -2.0, 0.5, 3.0], dtype="float32")



def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _linreg_loop(config: dict) -> None:
    """Linear regression, data-parallel; logs what the test checks into config['log_dir']."""
    import paddle
    import paddle.distributed as dist
    import paddle.nn.functional as F

    log_dir = config["log_dir"]
    rank, world = init_paddle_distributed()
    paddle.seed(1000 + rank)  # different initial weights per rank: DataParallel must sync them
    model = paddle.nn.Linear(DIM, 1)
    opt = paddle.optimizer.SGD(learning_rate=config["lr"], parameters=model.parameters())

    start_epoch = 0
    ckpt = latest_checkpoint_dir()
    if ckpt:
        model.set_state_dict(paddle.load(os.path.join(ckpt, "model.pdparams")))
        opt.set_state_dict(paddle.load(os.path.join(ckpt, "model.pdopt")))
        with open(os.path.join(ckpt, "state.json")) as f:
            start_epoch = json.load(f)["epoch"] + 1
    _append(os.path.join(log_dir, "starts.jsonl"),
            {"rank": rank, "world": world, "start_epoch": start_epoch, "pid": os.getpid(),
             "weight": model.weight.numpy().ravel().tolist(), "pg": bool(dist.is_initialized()),
             "env": {k: os.environ.get(k) for k in _PADDLE_ENV}})

    summed = paddle.to_tensor([float(rank + 1)])
    if world > 1:
        dist.all_reduce(summed)
    # the losses' global normaliser: the mean over ranks, the value itself in one process
    loss_norm = float(mean_over_ranks(paddle.to_tensor(float(rank + 1))))
    dp = paddle.DataParallel(model) if world > 1 else model

    rng = np.random.default_rng(0)
    x_all = rng.normal(size=(N_SAMPLES, DIM)).astype("float32")
    y_all = (x_all @ TRUE_W + 0.7)[:, None].astype("float32")

    for epoch in range(start_epoch, config["epochs"]):
        idx = shard_indices(N_SAMPLES, rank, world, seed=7, epoch=epoch)
        losses = []
        for step, b in enumerate(range(0, len(idx), BATCH)):
            kill = config.get("kill")
            if kill and (rank, epoch, step) == tuple(kill["at"]) and not os.path.exists(kill["marker"]):
                Path(kill["marker"]).touch()
                os.kill(os.getpid(), signal.SIGKILL)
            batch = idx[b:b + BATCH]
            loss = F.mse_loss(dp(paddle.to_tensor(x_all[batch])), paddle.to_tensor(y_all[batch]))
            loss.backward()
            opt.step()
            opt.clear_grad()
            losses.append(loss.item())
        mean_loss = all_reduce_mean(float(np.mean(losses)))
        np.save(os.path.join(log_dir, f"weight_r{rank}_e{epoch}.npy"), model.weight.numpy())
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                paddle.save(model.state_dict(), os.path.join(d, "model.pdparams"))
                paddle.save(opt.state_dict(), os.path.join(d, "model.pdopt"))
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump({"epoch": epoch}, f)
                _append(os.path.join(log_dir, "epochs.jsonl"), {"epoch": epoch, "loss": mean_loss})
            report_checkpoint({"epoch": epoch, "loss": mean_loss, "summed": summed.item(), "loss_norm": loss_norm, "world": world,
                               "rank": rank}, d, wait=config.get("wait", False))


def _config(tmp_path: Path, epochs: int, **extra) -> dict:
    log_dir = tmp_path / "log"
    log_dir.mkdir(exist_ok=True)
    return {"log_dir": str(log_dir), "epochs": epochs, "lr": 0.1, **extra}


def _load_checkpoint_weight(checkpoint) -> np.ndarray:
    import paddle

    with checkpoint.as_directory() as d:
        assert json.loads((Path(d) / "state.json").read_text())
        return paddle.load(str(Path(d) / "model.pdparams"))["weight"].numpy()


# --------------------------------------------------------------------------------------------


def test_shard_indices_cover_each_sample_once():
    for n, world in [(64, 2), (10, 3), (7, 4), (1, 2), (5, 1)]:
        per_rank = -(-n // world)
        for epoch in range(3):
            shards = [shard_indices(n, r, world, seed=3, epoch=epoch) for r in range(world)]
            assert all(len(s) == per_rank for s in shards)
            flat = np.concatenate(shards)
            assert set(flat.tolist()) == set(range(n))  # every sample seen
            counts = np.bincount(flat, minlength=n)
            assert counts.sum() - n == per_rank * world - n and counts.max() <= 2  # wrapped padding
            assert (counts == 2).sum() == per_rank * world - n
            again = [shard_indices(n, r, world, seed=3, epoch=epoch) for r in range(world)]
            assert all(np.array_equal(a, b) for a, b in zip(shards, again))  # deterministic
    # divisible: disjoint shards, exactly once per epoch
    s0, s1 = shard_indices(64, 0, 2, 0, 0), shard_indices(64, 1, 2, 0, 0)
    assert sorted(np.concatenate([s0, s1]).tolist()) == list(range(64))
    # the order changes across epochs and seeds, not across calls
    assert not np.array_equal(shard_indices(64, 0, 2, 0, 0), shard_indices(64, 0, 2, 0, 1))
    assert not np.array_equal(shard_indices(64, 0, 2, 0, 0), shard_indices(64, 0, 2, 1, 0))
    assert shard_indices(5, 0, 1, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    assert shard_indices(0, 0, 2).size == 0
    with pytest.raises(ValueError):
        shard_indices(4, 2, 2)


def test_backend_config_validates():
    assert PaddleBackendConfig().backend == "auto"
    with pytest.raises(ValueError):
        PaddleBackendConfig(backend="mpi")


def test_paddle_env_and_gpu_selection(monkeypatch):
    monkeypatch.setattr(os, "environ", {"FLAGS_selected_gpus": "3"})
    _set_paddle_env(1, 2, "10.0.0.1:6000", ["10.0.0.1:6001", "10.0.0.2:6002"], "gloo", 60)
    assert os.environ == {"PADDLE_TRAINER_ID": "1", "PADDLE_TRAINERS_NUM": "2",
                          "PADDLE_TRAINER_ENDPOINTS": "10.0.0.1:6001,10.0.0.2:6002",
                          "PADDLE_CURRENT_ENDPOINT": "10.0.0.2:6002", "PADDLE_MASTER": "10.0.0.1:6000",
                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000", "PADDLE_DISTRI_BACKEND": "gloo",
                          "PADDLE_PG_TIMEOUT": "60000"}
    monkeypatch.setattr("pipelines.train._local_gpu_ids", lambda: [2])
    _set_paddle_env(0, 2, "10.0.0.1:6000", ["10.0.0.1:6001", "10.0.0.2:6002"], "nccl", 60)
    assert os.environ["FLAGS_selected_gpus"] == "2" and os.environ["PADDLE_DISTRI_BACKEND"] == "nccl"
    monkeypatch.setattr("pipelines.train._local_gpu_ids", lambda: [])
    with pytest.raises(RuntimeError, match="no GPU"):
        _set_paddle_env(0, 2, "10.0.0.1:6000", ["10.0.0.1:6001", "10.0.0.2:6002"], "nccl", 60)
    # Ray Train shares CUDA_VISIBLE_DEVICES on a node: each worker picks its GPU by index
    assert _gpu_indices(["6"], "4,5,6,7") == [2]
    assert _gpu_indices(["4", "5"], "4,5,6,7") == [0, 1]
    assert _gpu_indices(["3"], "3") == [0]
    assert _gpu_indices(["1"], "") == [1]


def test_two_workers_gloo(ray_local, tmp_path):
    cfg = _config(tmp_path, epochs=4)
    result = train_on_ray(_linreg_loop, cfg, num_workers=2, storage_path=str(tmp_path / "runs"), name="gloo2",
                          num_to_keep=2)
    log = Path(cfg["log_dir"])
    assert result.error is None
    assert result.metrics["epoch"] == 3 and result.metrics["world"] == 2
    assert result.metrics["summed"] == 3.0  # all_reduce of rank+1 over 2 ranks
    assert result.metrics["loss_norm"] == 1.5  # mean_over_ranks of rank+1
    starts = _records(log / "starts.jsonl")
    assert sorted(s["rank"] for s in starts) == [0, 1] and all(s["pg"] and s["start_epoch"] == 0 for s in starts)
    env = {s["rank"]: s["env"] for s in starts}
    endpoints = env[0]["PADDLE_TRAINER_ENDPOINTS"].split(",")
    assert len(set(endpoints)) == 2 and env[1]["PADDLE_TRAINER_ENDPOINTS"] == env[0]["PADDLE_TRAINER_ENDPOINTS"]
    for r in (0, 1):
        assert env[r]["PADDLE_TRAINER_ID"] == str(r) and env[r]["PADDLE_TRAINERS_NUM"] == "2"
        assert env[r]["PADDLE_CURRENT_ENDPOINT"] == endpoints[r] and env[r]["PADDLE_DISTRI_BACKEND"] == "gloo"
        assert env[r]["PADDLE_MASTER"] == f'{env[0]["MASTER_ADDR"]}:{env[0]["MASTER_PORT"]}' == env[0]["PADDLE_MASTER"]
        assert env[r]["PADDLE_MASTER"] not in endpoints and env[r]["FLAGS_selected_gpus"] is None
        assert env[r]["PADDLE_PG_TIMEOUT"] == "1800000"
    assert starts[0]["weight"] != starts[1]["weight"]  # different init, so the equality below is DataParallel's
    for epoch in range(4):
        np.testing.assert_array_equal(np.load(log / f"weight_r0_e{epoch}.npy"), np.load(log / f"weight_r1_e{epoch}.npy"))
    losses = [r["loss"] for r in _records(log / "epochs.jsonl")]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.5, losses
    # rank 0's checkpoint: a model.pdparams, the last epoch's weights; only num_to_keep kept
    ckpt_dirs = [d for d in (tmp_path / "runs" / "gloo2").glob("checkpoint_*") if d.is_dir()]
    assert len(ckpt_dirs) == 2 and all((d / "model.pdparams").exists() for d in ckpt_dirs)
    np.testing.assert_array_equal(_load_checkpoint_weight(result.checkpoint), np.load(log / "weight_r0_e3.npy"))


def test_worker_failure_resumes_from_checkpoint(ray_local, tmp_path):
    marker = tmp_path / "killed.marker"
    # rank 1 dies at step 2 of epoch 1; wait=True: epoch 0's checkpoint is registered by then (epochs
    # here take milliseconds, less than the controller's 2 s poll interval)
    cfg = _config(tmp_path, epochs=3, kill={"at": [1, 1, 2], "marker": str(marker)}, wait=True)
    result = train_on_ray(_linreg_loop, cfg, num_workers=2, storage_path=str(tmp_path / "runs"), name="ft",
                          max_failures=1)
    log = Path(cfg["log_dir"])
    assert marker.exists()  # the kill happened (once)
    assert result.error is None and result.metrics["epoch"] == 2
    starts = _records(log / "starts.jsonl")
    first = [s for s in starts if s["start_epoch"] == 0]
    resumed = [s for s in starts if s["start_epoch"] > 0]
    assert len(first) == 2 and len(resumed) == 2, starts
    assert all(s["start_epoch"] == 1 for s in resumed)  # from epoch 0's checkpoint, the last one reported
    assert {s["pid"] for s in first}.isdisjoint(s["pid"] for s in resumed)  # new worker processes
    saved = np.load(log / "weight_r0_e0.npy").ravel().tolist()
    assert all(np.allclose(s["weight"], saved) for s in resumed)  # restored weights (both ranks loaded it)
    epochs = [r["epoch"] for r in _records(log / "epochs.jsonl")]
    assert epochs == [0, 1, 2]  # epoch 1 never reported before the crash, then done once
    np.testing.assert_array_equal(_load_checkpoint_weight(result.checkpoint), np.load(log / "weight_r0_e2.npy"))


def test_single_worker_on_s3_and_rerun_resumes(ray_local, tmp_path, s3_bucket, s3_server):
    """World size 1 (no process group), checkpoints on S3, and a second run of the same name
    continuing from the first one's last checkpoint (downloaded from S3)."""
    import boto3

    storage = f"s3://{s3_bucket}/runs"
    cfg = _config(tmp_path, epochs=2)
    log = Path(cfg["log_dir"])
    result = train_on_ray(_linreg_loop, cfg, num_workers=1, storage_path=storage, name="one")
    assert result.error is None and result.metrics["world"] == 1 and result.metrics["epoch"] == 1
    assert result.metrics["summed"] == 1.0
    starts = _records(log / "starts.jsonl")
    assert len(starts) == 1 and starts[0]["pg"] is False  # no process group for world size 1
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server)
            .list_objects_v2(Bucket=s3_bucket, Prefix="runs/one/").get("Contents", [])]
    ckpts = {k.split("/")[2] for k in keys if k.startswith("runs/one/checkpoint_") and k.endswith("/model.pdparams")}
    assert len(ckpts) == 2, keys
    np.testing.assert_array_equal(_load_checkpoint_weight(result.checkpoint), np.load(log / "weight_r0_e1.npy"))

    result2 = train_on_ray(_linreg_loop, {**cfg, "epochs": 3}, num_workers=1, storage_path=storage, name="one")
    assert result2.error is None and result2.metrics["epoch"] == 2
    starts = _records(log / "starts.jsonl")
    assert [s["start_epoch"] for s in starts] == [0, 2]
    assert np.allclose(starts[1]["weight"], np.load(log / "weight_r0_e1.npy").ravel())
    losses = [r["loss"] for r in _records(log / "epochs.jsonl")]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_helpers_outside_ray():
    """The same loop helpers work in a plain process: rank 0 of 1, no process group."""
    assert init_paddle_distributed() == (0, 1)
    assert all_reduce_mean(2.5) == 2.5
    assert float(mean_over_ranks(2.5)) == 2.5 and float(mean_over_ranks(paddle.to_tensor(4.0))) == 4.0
