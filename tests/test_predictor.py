"""The predictor end to end on real exported Paddle graphs (the tiny family models)."""

import io
import json
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest
from paddle.static import InputSpec

from instseg_core import create_model
from instseg_core.inference.model_dir import ModelDirError
from instseg_core.inputs import InputError
from instseg_core.masks import decode_rle
from tiny_models import build_tiny_model, input_specs

FAMILY_MODELS = ["MaskRCNN-ResNet50-FPN", "MaskRCNN-ResNet50", "Cascade-MaskRCNN-ResNet50-FPN", "Mask-RT-DETR-M",
                 "PP-YOLOE_seg-S", "SOLOv2"]


def _same(a, b):
    assert len(a) == len(b)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_array_equal(a.dense_masks(), b.dense_masks())


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_batched_equals_one_at_a_time(name, tiny_model_dirs, test_images):
    model = create_model(name, model_dir=tiny_model_dirs(name), device="cpu")
    one = [r.instances for r in model.predict(test_images, batch_size=1)]
    many = [r.instances for r in model.predict(test_images, batch_size=4)]
    assert len(one) == len(test_images)
    for a, b in zip(one, many):
        _same(a, b)
        assert len(a) > 0 and a.dense_masks().shape[1:] == a.image_size


def test_keep_ratio_model_really_batches(tiny_model_dirs, test_images):
    model = create_model("MaskRCNN-ResNet50-FPN", model_dir=tiny_model_dirs("MaskRCNN-ResNet50-FPN"), device="cpu")
    list(model.predict(test_images, batch_size=3))  # images of different sizes in one call
    assert model._one_at_a_time is False


def test_threshold_precedence(tiny_model_dirs, test_images):
    d = tiny_model_dirs("MaskRCNN-ResNet50-FPN")
    img = test_images[0]
    default = next(create_model(model_dir=d).predict(img))  # draw_threshold 0.5 from inference.yml
    low = create_model(model_dir=d, threshold=0.05)
    assert len(next(low.predict(img))["boxes"]) > len(default["boxes"])
    assert len(next(low.predict(img, threshold=0.5))["boxes"]) == len(default["boxes"])
    assert all(b["score"] > 0.5 for b in default["boxes"])


def test_rle_masks_decode_to_the_dense_masks(tiny_model_dirs, test_images):
    d = tiny_model_dirs("Mask-RT-DETR-M")
    dense = next(create_model(model_dir=d).predict(test_images[0]))
    rle = next(create_model(model_dir=d, mask_format="rle").predict(test_images[0]))
    assert all(isinstance(m, dict) and set(m) == {"size", "counts"} for m in rle["masks"])
    np.testing.assert_array_equal(decode_rle(rle["masks"]), dense.instances.dense_masks())
    json.dumps(rle.json)  # JSON-ready


def test_array_list_and_directory_inputs(tiny_model_dirs, test_images, tmp_path):
    model = create_model(model_dir=tiny_model_dirs("MaskRCNN-ResNet50-FPN"))
    arr = cv2.imread(test_images[0])
    res = list(model.predict([arr, test_images[0]]))
    assert res[0]["input_path"] is None and res[1]["input_path"] == test_images[0]
    _same(res[0].instances, res[1].instances)
    (tmp_path / "sub").mkdir()
    for i, p in enumerate(test_images[:3]):
        (tmp_path / ("sub" if i else "") / f"{i}.jpg").write_bytes(Path(p).read_bytes())
    paths = [r["input_path"] for r in model.predict(str(tmp_path), batch_size=2)]
    assert paths == sorted(paths) and len(paths) == 3


def test_bad_inputs_name_the_item(tiny_model_dirs, test_images, tmp_path):
    model = create_model(model_dir=tiny_model_dirs("MaskRCNN-ResNet50-FPN"))
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="nope.jpg"):
        list(model.predict(str(missing)))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(InputError, match="notes.jpg"):
        list(model.predict(str(text)))
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(Path(test_images[0]).read_bytes()[:5000])
    with pytest.raises(InputError, match="cut.jpg.*truncated"):
        list(model.predict(str(truncated)))
    # results before the bad batch still come out
    gen = model.predict([test_images[0], test_images[1], str(text)], batch_size=2)
    assert len(next(gen)["boxes"]) > 0 and len(next(gen)["boxes"]) > 0
    with pytest.raises(InputError, match="notes.jpg"):
        next(gen)


def test_wrong_model_dir_and_mismatched_name(tiny_model_dirs, tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        create_model("SOLOv2", model_dir=tmp_path / "missing")
    with pytest.raises(ModelDirError, match="model name mismatch"):
        create_model("SOLOv2", model_dir=tiny_model_dirs("MaskRCNN-ResNet50-FPN"))
    with pytest.raises(ValueError, match="batch_size"):
        create_model(model_dir=tiny_model_dirs("SOLOv2"), batch_size=0)
    with pytest.raises(ValueError, match="unsupported device"):
        create_model(model_dir=tiny_model_dirs("SOLOv2"), device="tpu:0")


class _SummedBboxNum(paddle.nn.Layer):
    """A graph that cannot describe a batch: bbox_num is summed over images."""

    def __init__(self):
        super().__init__()
        self.inner = build_tiny_model("MaskRCNN")

    def forward(self, im_shape, image, scale_factor):
        out = self.inner(im_shape, image, scale_factor)
        return {"bbox": out["bbox"], "bbox_num": out["bbox_num"].sum(keepdim=True), "mask": out["mask"]}


def test_graph_that_cannot_batch_falls_back(tiny_model_dirs, test_images, tmp_path, caplog):
    d = tmp_path / "nobatch"
    paddle.jit.save(_SummedBboxNum(), str(d / "inference"), input_spec=input_specs())
    (d / "inference.yml").write_text((tiny_model_dirs("MaskRCNN-ResNet50-FPN") / "inference.yml").read_text())
    model = create_model(model_dir=d)
    batched = [r.instances for r in model.predict(test_images[:3], batch_size=3)]
    assert model._one_at_a_time and "one at a time" in caplog.text
    ref = create_model(model_dir=tiny_model_dirs("MaskRCNN-ResNet50-FPN"))
    for a, r in zip(batched, ref.predict(test_images[:3])):
        _same(a, r.instances)


def test_graph_failing_under_onednn_falls_back(tmp_path, caplog):
    from instseg_core.inference.engine import EngineOptions, InferenceEngine

    class Upsample(paddle.nn.Layer):  # float scale lists are not supported by oneDNN under PIR
        def forward(self, x):
            return paddle.nn.functional.interpolate(x, scale_factor=[1.5, 1.5], mode="bilinear")

    paddle.jit.save(Upsample(), str(tmp_path / "inference"), input_spec=[InputSpec([1, 3, 8, 8], "float32", "x")])
    eng = InferenceEngine(tmp_path / "inference.json", tmp_path / "inference.pdiparams",
                          EngineOptions(device="cpu", enable_onednn=True))
    out = eng.run({"x": np.ones((1, 3, 8, 8), np.float32)})
    assert out[0].shape == (1, 3, 12, 12) and np.allclose(out[0], 1)
    assert eng.onednn is False and "oneDNN" in caplog.text


def test_out_of_memory_is_not_taken_for_a_onednn_failure(tmp_path):
    """A first run that fails to allocate raises (MemoryError) and leaves oneDNN on: rebuilding
    without it would only slow every later image down."""
    from instseg_core.inference.engine import EngineOptions, InferenceEngine

    class Big(paddle.nn.Layer):  # allocates an n x n float32 tensor
        def forward(self, x):
            n = paddle.cast(x[0, 0], "int64").reshape([1])
            return paddle.zeros(paddle.concat([n, n]), dtype="float32").sum().reshape([1]) + x[0, :1]

    paddle.jit.save(Big(), str(tmp_path / "inference"), input_spec=[InputSpec([1, 2], "float32", "x")])
    eng = InferenceEngine(tmp_path / "inference.json", tmp_path / "inference.pdiparams",
                          EngineOptions(device="cpu", enable_onednn=True))
    with pytest.raises(MemoryError):
        eng.run({"x": np.array([[4e6, 1]], np.float32)})  # 64 TB
    assert eng.onednn is True
    assert eng.run({"x": np.array([[4, 1]], np.float32)})[0].tolist() == [4.0]


class _TarHandler(BaseHTTPRequestHandler):
    payload = b""
    hits = 0

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        if not self.path.endswith("/MaskRCNN-ResNet50-FPN_infer.tar"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_create_model_without_dir_downloads_and_caches(tiny_model_dirs, test_images, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(tiny_model_dirs("MaskRCNN-ResNet50-FPN"), arcname="MaskRCNN-ResNet50-FPN_infer")
    _TarHandler.payload, _TarHandler.hits = buf.getvalue(), 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TarHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("INSTSEG_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("INSTSEG_MODEL_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/models/")
        for _ in range(2):
            res = next(create_model("MaskRCNN-ResNet50-FPN").predict(test_images[0]))
            assert len(res["boxes"]) > 0
        assert _TarHandler.hits == 1
        assert (tmp_path / "home" / "official_models" / "MaskRCNN-ResNet50-FPN" / "inference.yml").is_file()
    finally:
        server.shutdown()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "instseg_core", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_predict_saves_json_and_images(tiny_model_dirs, test_images, tmp_path):
    d = tiny_model_dirs("SOLOv2")
    out = tmp_path / "out"
    proc = _cli("predict", "--model", "SOLOv2", "--model-dir", str(d), "--input", *test_images[:2],
                "--batch-size", "2", "--threshold", "0.3", "--save-path", str(out), "--mask-format", "rle")
    assert proc.returncode == 0, proc.stderr
    stems = [Path(p).stem for p in test_images[:2]]
    for s in stems:
        data = json.loads((out / f"{s}_res.json").read_text())
        assert data["input_path"].endswith(f"{s}.jpg") and data["boxes"] and data["masks"][0]["counts"]
        assert (out / f"{s}_res.jpg").is_file()
    assert proc.stdout.count("'res'") == 2


def test_cli_errors(tiny_model_dirs, tmp_path):
    proc = _cli("predict", "--model-dir", str(tiny_model_dirs("SOLOv2")), "--input", str(tmp_path / "x.jpg"))
    assert proc.returncode == 2 and "x.jpg" in proc.stderr and "does not exist" in proc.stderr
    proc = _cli("predict", "--input", "a.jpg")
    assert proc.returncode == 2 and "--model" in proc.stderr
    assert "Mask-RT-DETR-H" in _cli("models").stdout


def test_predict_from_s3_prefix(tiny_model_dirs, test_images, s3_bucket, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for i, p in enumerate(test_images[:2]):
        s3.put_object(Bucket=s3_bucket, Key=f"in/{i}.jpg", Body=Path(p).read_bytes())
    model = create_model(model_dir=tiny_model_dirs("MaskRCNN-ResNet50-FPN"))
    res = list(model.predict(f"s3://{s3_bucket}/in/", batch_size=2))
    assert [r["input_path"] for r in res] == [f"s3://{s3_bucket}/in/0.jpg", f"s3://{s3_bucket}/in/1.jpg"]
    local = list(model.predict(test_images[:2]))
    for a, b in zip(res, local):
        _same(a.instances, b.instances)
    with pytest.raises(InputError, match="missing.jpg"):
        list(model.predict(f"s3://{s3_bucket}/in/missing.jpg"))
