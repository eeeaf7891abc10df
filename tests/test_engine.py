"""The engine on graph formats PaddleX model dirs come in: PIR ``inference.json`` and legacy ``.pdmodel``."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from instseg_core.inference.engine import EngineOptions, InferenceEngine, parse_device

HERE = Path(__file__).parent


def test_legacy_pdmodel_graph_runs(tmp_path):
    # exported by Paddle's legacy (non-PIR) program format, as older official tarballs are
    env = dict(os.environ, FLAGS_enable_pir_api="0")
    proc = subprocess.run([sys.executable, str(HERE / "data" / "export_legacy_graph.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "inference.pdmodel").is_file() and not (tmp_path / "inference.json").exists()
    for onednn in (False, True):
        eng = InferenceEngine(tmp_path / "inference.pdmodel", tmp_path / "inference.pdiparams",
                              EngineOptions(device="cpu", enable_onednn=onednn, cpu_threads=1))
        out = eng.run({"x": np.load(tmp_path / "x.npy")})
        np.testing.assert_allclose(out[0], np.load(tmp_path / "expected.npy"), atol=1e-5)
        assert eng.input_names == ["x"]


def test_parse_device():
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("CPU") == ("cpu", 0)
    import paddle

    if not paddle.device.is_compiled_with_cuda():
        assert parse_device(None) == ("cpu", 0)
