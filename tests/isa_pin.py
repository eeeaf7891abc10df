"""The CPU instruction-set pin of the test run (README "Tests").

MKL and oneDNN pick their kernels by the CPU they run on, and kernels of different instruction
sets round differently (the sum order of a dot product changes with the vector width). The
oracle comparisons follow top-k selections (R-CNN proposals, Mask-RT-DETR's query selection), so a
last-bit change can reorder rows. To get the same numbers on every x86-64 CPU, the tests run with

* ``MKL_CBWR=COMPATIBLE``: MKL's conditional-numerical-reproducibility branch that every x86-64
  CPU, Intel or not, runs (the SSE2 kernels). It is the branch MKL 2019 (Paddle 3.3's) already
  takes on AMD CPUs, where it also rejects ``AVX2`` (falls back to ``AUTO``); the oracles match it
  bit for bit (e.g. Mask-RT-DETR's encoder outputs, the R-CNN features).
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (Paddle Inference with ``enable_mkldnn``) limited to its
  AVX2 kernels, which every CPU of the last ten years has.

:func:`apply` sets both (unless already set) in ``os.environ``; ``tests/conftest.py`` calls it
before anything imports Paddle, so the test process and every process it starts (subprocesses,
the PaddleX runner, Ray workers) inherit it. MKL reads ``MKL_CBWR`` at its first call, oneDNN
``ONEDNN_MAX_CPU_ISA`` at its first primitive: setting them later has no effect in that process.
:func:`effective` reads back what the libraries actually use.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

ISA_PIN: dict[str, str] = {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}

MKL_CBWR_COMPATIBLE = 3  # mkl_cbwr.h: MKL_CBWR_COMPATIBLE
MKL_CBWR_BRANCH = 1  # mkl_cbwr.h: the branch part of the setting
DNNL_CPU_ISA_AVX2 = 0x7  # dnnl_types.h: dnnl_cpu_isa_avx2; an ISA value is a bit mask of its features


def apply() -> None:
    """Set the pinned variables in ``os.environ`` unless the caller set them already."""
    for key, value in ISA_PIN.items():
        os.environ.setdefault(key, value)


def _paddle_lib(name: str) -> ctypes.CDLL | None:
    """``paddle/libs/<name>`` opened (the copy Paddle itself loaded), or None when absent."""
    import paddle

    path = Path(paddle.__file__).parent / "libs" / name
    return ctypes.CDLL(str(path)) if path.exists() else None


def effective() -> dict[str, int | None]:
    """What this process's MKL and oneDNN use: ``mkl_cbwr_branch`` (3 = COMPATIBLE, 1 = off) and
    ``onednn_isa`` (a ``dnnl_cpu_isa_t``; 0x7 = AVX2, 0x27 = AVX512_CORE, ...); None for a library
    this Paddle build does not ship. Querying initialises the setting, like a first call would."""
    out: dict[str, int | None] = {"mkl_cbwr_branch": None, "onednn_isa": None}
    mkl = _paddle_lib("libmklml_intel.so")
    if mkl is not None:
        mkl.mkl_serv_cbwr_get.restype, mkl.mkl_serv_cbwr_get.argtypes = ctypes.c_int, [ctypes.c_int]
        out["mkl_cbwr_branch"] = int(mkl.mkl_serv_cbwr_get(MKL_CBWR_BRANCH))
    dnnl = _paddle_lib("libdnnl.so.3")
    if dnnl is not None:
        dnnl.dnnl_get_effective_cpu_isa.restype = ctypes.c_int
        out["onednn_isa"] = int(dnnl.dnnl_get_effective_cpu_isa())
    return out


def pin_problems(env: dict[str, str], eff: dict[str, int | None]) -> list[str]:
    """Why the pin is not in effect in a process with environment ``env`` and :func:`effective`
    values ``eff``; empty when it is."""
    problems = [f"{k}={env.get(k)!r}, pinned {v!r}" for k, v in ISA_PIN.items() if env.get(k) != v]
    if env.get("MKL_DEBUG_CPU_TYPE"):  # forces one of MKL's kernel sets, MKL_CBWR notwithstanding
        problems.append(f"MKL_DEBUG_CPU_TYPE={env['MKL_DEBUG_CPU_TYPE']!r} overrides MKL_CBWR")
    if eff["mkl_cbwr_branch"] is not None and eff["mkl_cbwr_branch"] != MKL_CBWR_COMPATIBLE:
        problems.append(f"MKL runs CNR branch {eff['mkl_cbwr_branch']}, not COMPATIBLE ({MKL_CBWR_COMPATIBLE})")
    if eff["onednn_isa"] is not None and eff["onednn_isa"] & ~DNNL_CPU_ISA_AVX2:
        problems.append(f"oneDNN runs ISA {eff['onednn_isa']:#x}, above AVX2 ({DNNL_CPU_ISA_AVX2:#x})")
    return problems
