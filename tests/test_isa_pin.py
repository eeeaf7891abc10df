"""The CPU instruction-set pin (``tests/isa_pin.py``) is in effect in the test process and in the
processes it starts: a plain subprocess and a Ray worker. Each reads back what its MKL and oneDNN
actually use (``isa_pin.effective``), not only the environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import isa_pin
import pytest

TESTS = Path(__file__).resolve().parent


def test_pin_in_effect_in_test_process():
    import paddle

    # a first MKL call: the branch read back afterwards is the one the kernels ran with
    paddle.matmul(paddle.ones([8, 8]), paddle.ones([8, 8]))
    eff = isa_pin.effective()
    assert eff["mkl_cbwr_branch"] is not None and eff["onednn_isa"] is not None  # Paddle ships both
    problems = isa_pin.pin_problems(dict(os.environ), eff)
    assert not problems, problems


def test_pin_in_effect_in_subprocess():
    """A child started with the inherited environment, as the PaddleX runner and ``ray start`` are."""
    code = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); import isa_pin; "
            "print(json.dumps({'env': dict(os.environ), 'eff': isa_pin.effective()}))")
    proc = subprocess.run([sys.executable, "-c", code, str(TESTS)], capture_output=True, text=True, timeout=300,
                          check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = isa_pin.pin_problems(got["env"], got["eff"])
    assert not problems, problems


@pytest.mark.slow
def test_pin_in_effect_in_ray_worker(ray_local):
    import ray

    def report() -> dict:  # defined here so Ray ships it by value (the worker cannot import this module)
        import ctypes
        import os
        from pathlib import Path

        import paddle

        libs = Path(paddle.__file__).parent / "libs"
        mkl, dnnl = ctypes.CDLL(str(libs / "libmklml_intel.so")), ctypes.CDLL(str(libs / "libdnnl.so.3"))
        mkl.mkl_serv_cbwr_get.restype, mkl.mkl_serv_cbwr_get.argtypes = ctypes.c_int, [ctypes.c_int]
        dnnl.dnnl_get_effective_cpu_isa.restype = ctypes.c_int
        return {"env": dict(os.environ), "eff": {"mkl_cbwr_branch": int(mkl.mkl_serv_cbwr_get(1)),
                                                 "onednn_isa": int(dnnl.dnnl_get_effective_cpu_isa())}}

    got = ray.get(ray.remote(num_cpus=1)(report).remote(), timeout=300)
    problems = isa_pin.pin_problems(got["env"], got["eff"])
    assert not problems, problems
