"""``python -m jobs.train`` on a real local Ray: 2 workers (gloo), dataset and checkpoints on S3.

The same module config as ``instseg run -o Global.mode=train``; the job shards images across the
workers, rank 0 writes PaddleX's outputs, checkpoints go to the S3 run directory and the output
folder is copied there at the end.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray")



def _upload(fs, local: Path, remote: str) -> None:
    for f in local.rglob("*"):
        if f.is_file():
            fs.put_file(str(f), f"{remote}/{f.relative_to(local).as_posix()}")


@pytest.mark.slow
def test_two_worker_fine_tune_with_s3_dataset_and_storage(ray_local, s3_bucket, tmp_path, monkeypatch):
    from instseg_core.datasets.synthetic import make_dataset
    from jobs.train import main
    from pipelines.storage import S3Options, fsspec_fs

    monkeypatch.setenv("INSTSEG_HOME", str(tmp_path / "home"))
    data = make_dataset(tmp_path / "shapes", num_train=8, num_val=2, size=96, seed=3)
    fs = fsspec_fs(f"s3://{s3_bucket}", S3Options.from_env())
    _upload(fs, data, f"{s3_bucket}/datasets/shapes")
    out = tmp_path / "out"
    code = main(["-c", "PP-YOLOE_seg-S",
                 "-o", f"Global.dataset_dir=s3://{s3_bucket}/datasets/shapes", "-o", f"Global.output={out}",
                 "-o", "Train.num_classes=4", "-o", "Train.epochs_iters=2", "-o", "Train.batch_size=2",
                 "-o", "Train.input_size=96", "-o", "Train.warmup_steps=1", "-o", "Train.log_interval=1",
                 "-o", "Train.pretrain_weight_path=None",
                 "-o", "Train.arch={'width_mult': 0.125, 'num_protos': 16}",
                 "--num-workers", "2", "--storage-path", f"s3://{s3_bucket}/runs", "--name", "shapes",
                 "--max-failures", "0"])
    assert code == 0
    record = json.loads((out / "train_result.json").read_text())
    assert record["done_flag"] is True and record["models"]["last_1"]["pdparams"] == "1/1.pdparams"
    log = (out / "train.log").read_text()
    # 8 images over 2 workers with batch 2: 2 steps per epoch on each worker
    assert "2 epochs x 2 steps, batch 2 x 2 worker(s)" in log
    fs.invalidate_cache()
    keys = fs.find(f"{s3_bucket}/runs/shapes")
    assert any(k.endswith("/1.pdparams") and "checkpoint_" in k for k in keys), keys
    assert f"{s3_bucket}/runs/shapes/output/train_result.json" in keys
    assert f"{s3_bucket}/runs/shapes/output/best_model/inference/inference.yml" in keys
