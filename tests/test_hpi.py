"""High-performance mode (``use_hpip=True``): ONNX Runtime and OpenVINO against normal mode.

Per family, on real exports: PP-YOLOE_seg (the demo model, trained weights) and Mask-RT-DETR-S
(oracle-rule weights, input 320) run their split head graph on each backend and must give
normal mode's detections (matched as sets: label, |dscore| <= 1e-3, box <= 1 px, masks as in
``oracle_utils.mask_agrees``). MaskRCNN and SOLOv2 exports have no split graph: the converter
aborts on (or rejects) their whole graph, in its own process, and the predictor falls back to
Paddle Inference with one warning, giving normal mode's results. The ONNX cache is built once
when two processes ask at the same time.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES, missing_tool
from oracle_utils import instance_rows, match_with_masks

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "data" / "coco_tiny_val2017" / "val2017" / "000000005001.jpg"
HPI_PACKAGES = ("paddle2onnx", "onnxruntime", "openvino")


@pytest.fixture(autouse=True)
def _hpi_installed():
    absent = [p for p in HPI_PACKAGES if importlib.util.find_spec(p) is None]
    if absent:
        missing_tool(f"high-performance packages not installed: {', '.join(absent)} (pip install 'instseg[hpi]')")


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".onnx"))
    return dst


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A copy of the demo model (its ONNX cache goes into the copy, not the repo)."""
    return _copy_model(SAMPLES / "model", tmp_path_factory.mktemp("hpi") / "demo")


@pytest.fixture(scope="module")
def mask_rtdetr_dir(tmp_path_factory) -> Path:
    """Mask-RT-DETR-S with the oracle-rule weights (scores spread like a trained model's), input 320."""
    from oracle_utils import oracle_available, oracle_model

    from instseg_core.export import export_model

    if not oracle_available("Mask-RT-DETR-S") or not PHOTO.exists():
        pytest.skip("shared/oracles/Mask-RT-DETR-S or the test photo not available")
    return export_model(oracle_model("Mask-RT-DETR-S"), None, tmp_path_factory.mktemp("hpi") / "mask_rtdetr",
                        input_size=320)


def _images(n: int = 4) -> list[np.ndarray]:
    paths = sorted((SAMPLES / "shapes").glob("*.jpg"))[:n]
    return [cv2.imread(str(p)) for p in paths]


def _assert_same(expected, got, *, threshold_gap: float = 2e-3) -> None:
    for exp, out in zip(expected, got):
        # a detection within the score tolerance of the threshold may be on either side of it
        exp_rows, out_rows = instance_rows(exp), instance_rows(out)
        firm = exp_rows[:, 1] > threshold_gap + exp.scores.min() if len(exp) else exp_rows[:, 1] > 0
        m = match_with_masks(exp_rows[firm], exp.masks[firm], out_rows, out.masks)
        assert m.unmatched == 0 and m.mask_failures == 0, m
        assert abs(len(out) - len(exp)) <= int((~firm).sum()), (len(exp), len(out))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_demo_model_matches_normal_mode(demo_dir, backend):
    from instseg_core import create_model

    images = _images()
    normal = create_model(model_dir=demo_dir, threshold=0.3).predict_arrays(images)
    fast = create_model(model_dir=demo_dir, threshold=0.3, use_hpip=True, hpi_config={"backend": backend})
    assert fast.engine.backend == backend
    got = fast.predict_arrays(images)
    assert sum(len(r) for r in normal) >= 8  # the trained demo model finds the shapes
    _assert_same(normal, got)
    assert list((demo_dir / "hpi" / ".onnx").glob("head-*.onnx"))  # cached next to the graph


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_mask_rtdetr_matches_normal_mode(mask_rtdetr_dir, backend):
    from instseg_core import create_model

    photo = cv2.imread(str(PHOTO))
    images = [photo, np.ascontiguousarray(photo[40:400, 100:560][:, ::-1])]
    normal = create_model(model_dir=mask_rtdetr_dir, threshold=0.3).predict_arrays(images)
    fast = create_model(model_dir=mask_rtdetr_dir, threshold=0.3, use_hpip=True, hpi_config={"backend": backend})
    assert fast.engine.backend == backend
    got = fast.predict_arrays(images)
    assert sum(len(r) for r in normal) > 0
    _assert_same(normal, got)


def test_auto_config_picks_the_tables_backend(demo_dir, caplog):
    from instseg_core import create_model
    from instseg_core.inference.hpi import AUTO_BACKENDS

    with caplog.at_level(logging.INFO, logger="instseg"):
        model = create_model(model_dir=demo_dir, use_hpip=True)
    assert model.engine.backend == AUTO_BACKENDS[("PPYOLOE_seg", "cpu")][0]
    # auto_config off and no backend: Paddle Inference, as PaddleX
    assert create_model(model_dir=demo_dir, use_hpip=True, hpi_config={"auto_config": False}).engine.backend == "paddle"


@pytest.fixture(scope="module")
def whole_graph_dirs(tmp_path_factory) -> dict[str, Path]:
    """MaskRCNN-ResNet50-FPN and SOLOv2 exports (random weights, small inputs): no split graph."""
    import paddle

    from instseg_core.export import export_model
    from instseg_core.modeling.build import build_model

    paddle.seed(0)
    root = tmp_path_factory.mktemp("whole")
    return {name: export_model(build_model(name, num_classes=2), None, root / name, input_size=224, labels=["a", "b"])
            for name in ("MaskRCNN-ResNet50-FPN", "SOLOv2")}


@pytest.mark.parametrize("name", ["MaskRCNN-ResNet50-FPN", "SOLOv2"])
def test_converter_failure_falls_back_with_one_warning(whole_graph_dirs, name, caplog):
    """paddle2onnx dies (SIGABRT) on the R-CNN graph and raises on SOLOv2's: in its own process, so
    this one lives on, warns once naming the reason, and predicts as normal mode does."""
    from instseg_core import create_model

    model_dir = whole_graph_dirs[name]
    images = _images(2)
    expected = create_model(model_dir=model_dir, threshold=0.0).predict_arrays(images)
    with caplog.at_level(logging.WARNING, logger="instseg"):
        model = create_model(model_dir=model_dir, threshold=0.0, use_hpip=True, hpi_config={"backend": "onnxruntime"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert model.engine.backend == "paddle"
    assert len(warnings) == 1 and "onnxruntime" in warnings[0] and "paddle2onnx cannot convert" in warnings[0], warnings
    got = model.predict_arrays(images)
    for exp, out in zip(expected, got):
        assert np.array_equal(instance_rows(exp), instance_rows(out))
    # the failure is remembered: a second predictor does not run the converter again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="instseg"):
        create_model(model_dir=model_dir, use_hpip=True, hpi_config={"backend": "openvino"})
    assert "paddle2onnx cannot convert" in caplog.text
    assert list((model_dir / ".onnx").glob("inference-*.failed"))


def test_two_processes_convert_once(demo_dir, tmp_path):
    """Two processes ask for the same ONNX file at once: one converts, the other waits and reuses it."""
    model_dir = _copy_model(demo_dir, tmp_path / "demo")
    script = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from instseg_core.inference.onnx_convert import onnx_for
        print("ONNX", onnx_for(sys.argv[1], sys.argv[2]))
    """)
    head = model_dir / "hpi" / "head.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(head), str(head.with_suffix(".pdiparams"))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    paths = {line.split(" ", 1)[1] for out in outputs for line in out.splitlines() if line.startswith("ONNX ")}
    assert len(paths) == 1
    assert sum(out.count("converted ") for out in outputs) == 1, outputs
    assert len(list((model_dir / "hpi" / ".onnx").glob("*.onnx"))) == 1
    assert not list((model_dir / "hpi" / ".onnx").glob(".*.tmp"))


def test_missing_backend_package_explains_how_to_install(demo_dir):
    """Without onnxruntime installed, use_hpip warns with the install command and runs normal mode."""
    script = textwrap.dedent("""
        import logging, sys
        sys.modules["onnxruntime"] = None  # as if not installed: importing it raises ImportError
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from instseg_core import create_model
        m = create_model(model_dir=sys.argv[1], use_hpip=True, hpi_config={"backend": "onnxruntime"})
        print("BACKEND", m.engine.backend)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(demo_dir)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "BACKEND paddle" in out.stdout
    assert 'pip install "instseg[hpi]"' in out.stderr


@pytest.mark.parametrize("config, message", [
    ({"backend": "tensorrtx"}, "unknown hpi backend"),
    ({"backend": "openvino", "backend_config": {"run_mode": "x"}}, "unknown backend_config option"),
    ({"backend": "paddle", "backend_config": {"run_mode": "fast"}}, "run_mode must be one of"),
    ({"backends": "openvino"}, "unknown hpi_config key"),
    ("{'backend': ", "dict literal"),
    ({"backend_config": {"cpu_num_threads": 2}}, "needs hpi_config.backend"),
])
def test_bad_hpi_config_is_one_clear_error(config, message):
    from instseg_core.inference.hpi import parse_hpi_config

    with pytest.raises(ValueError, match=message):
        parse_hpi_config(config)


def test_paddlex_string_form_and_context_keys():
    from instseg_core.inference.hpi import parse_hpi_config

    cfg = parse_hpi_config("{'backend': 'openvino', 'backend_config': {'cpu_num_threads': 2}, 'device_type': 'cpu'}")
    assert (cfg.backend, cfg.backend_config, cfg.auto_config) == ("openvino", {"cpu_num_threads": 2}, True)


def test_cli_predict_with_hpi_backend(demo_dir, tmp_path):
    """`instseg predict --hpi-backend openvino` writes the same JSON as normal mode."""
    import json

    image = sorted((SAMPLES / "shapes").glob("*.jpg"))[0]
    results = {}
    for mode, flags in (("normal", []), ("hpi", ["--hpi-backend", "openvino"])):
        out = tmp_path / mode
        proc = subprocess.run([sys.executable, "-m", "instseg_core", "predict", "--model-dir", str(demo_dir),
                               "--input", str(image), "--save-path", str(out), "--quiet", *flags],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        results[mode] = json.loads(next(out.glob("*_res.json")).read_text())
    exp, got = results["normal"]["boxes"], results["hpi"]["boxes"]
    assert [b["cls_id"] for b in exp] == [b["cls_id"] for b in got]
    assert np.allclose([b["coordinate"] for b in exp], [b["coordinate"] for b in got], atol=0.5)


def test_batch_job_with_hpi_backend(ray_local, demo_dir, tmp_path):
    """The Ray batch job with ``use_hpip`` (OpenVINO): each image's instances as the predictor's
    normal mode finds them, and the settings in summary.json."""
    import pyarrow.parquet as pq

    from instseg_core import create_model
    from pipelines.batch_predict import BatchPredictConfig, run_batch_predict

    src = SAMPLES / "shapes"
    summary = run_batch_predict(BatchPredictConfig(
        input=str(src), output=str(tmp_path / "out"), model_dir=str(demo_dir), batch_size=2, threshold=0.5,
        use_hpip=True, hpi_config={"backend": "openvino"}))
    assert summary["use_hpip"] is True and summary["hpi_config"] == {"backend": "openvino"}
    rows = pq.read_table(tmp_path / "out" / "parts").to_pylist()
    got = {Path(r["uri"]).name: len(r["instances"]) for r in rows}
    normal = create_model(model_dir=demo_dir, threshold=0.5)
    paths = sorted(src.glob("*.jpg"))
    expected = {p.name: len(normal.predict_arrays([cv2.imread(str(p))])[0]) for p in paths}
    assert got == expected and sum(expected.values()) > 0


def test_split_post_process_draws_masks_only_above_the_threshold(demo_dir):
    """The split post-process graph takes the predictor's threshold: rows at or below it get no mask
    (they are not in its output at all), so a high threshold costs fewer masks."""
    from instseg_core import create_model
    from instseg_core.inference.predictor import _graph_inputs

    model = create_model(model_dir=demo_dir, use_hpip=True, hpi_config={"backend": "openvino"})
    samples = model.preprocess(_images(2))
    low = model.engine.run(_graph_inputs(samples, 0.0))
    high = model.engine.run(_graph_inputs(samples, 0.6))
    bbox_low, bbox_high = low[0], high[0]
    assert len(bbox_high) < len(bbox_low)
    assert (bbox_high[:, 1] > 0.6).all() and high[2].shape[0] == len(bbox_high)
    assert high[1].sum() == len(bbox_high)  # per-image counts follow the kept rows
