"""The Serve endpoint (pipelines/serve.py): real HTTP on loopback against ``serve.run`` of the app
on the demo model in the session's local Ray; responses compared with ``create_model().predict``."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from conftest import COCO_IMAGES, REPO, SAMPLES

pytest.importorskip("ray.serve")

MODEL_DIR = SAMPLES / "model"
SHAPES = SAMPLES / "shapes_0.jpg"
ENVELOPE_KEYS = {"logId", "errorCode", "errorMsg", "result"}


# ---------------------------------------------------------------------- helpers


def _b64(path: Path | bytes) -> str:
    data = path if isinstance(path, bytes) else path.read_bytes()
    return base64.b64encode(data).decode("ascii")


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, chunked: bool = False) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if chunked:  # no Content-Length: the endpoint has to count the bytes itself
            conn.request(method, path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                         headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _infer(port: int, payload: dict | bytes, **kwargs) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _request(port, "POST", "/instance-segmentation", body, {"Content-Type": "application/json"}, **kwargs)


def _expected(model, path: Path, threshold: float | None = None) -> list[dict]:
    """What PaddleX's serving app makes of ``predict``'s result, computed independently here."""
    res = next(iter(model.predict(str(path), threshold=threshold)))
    out = []
    for box, mask in zip(res["boxes"], res["masks"]):
        rle = mask_util.encode(np.asarray(mask[..., None], order="F", dtype=np.uint8))[0]
        out.append({"bbox": box["coordinate"], "categoryId": box["cls_id"], "categoryName": box["label"],
                    "score": box["score"], "mask": {"rleResult": rle["counts"].decode(), "size": list(mask.shape)}})
    return out


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _assert_refused(status: int, body: dict, expected_status: int, words: str) -> None:
    assert status == expected_status, (status, body)
    assert set(body) == ENVELOPE_KEYS, body
    assert body["errorCode"] == expected_status and body["result"] is None, body
    assert words.lower() in body["errorMsg"].lower(), body["errorMsg"]


# ---------------------------------------------------------------------- fixtures


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    photo = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        port = self.server.server_address[1]
        if self.path == "/img.jpg":
            self._send(self.photo)
        elif self.path == "/redirect-same-host":
            self._redirect("/img.jpg")
        elif self.path == "/redirect-out":
            self._redirect(f"http://localhost:{port}/img.jpg")  # same server, host not allowed
        elif self.path == "/big":
            self._send(b"\xff" * 1_500_000)
        elif self.path == "/big-unsized":  # no Content-Length: only counting stops it
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(30):
                    self.wfile.write(b"\xff" * 65536)
            except OSError:
                pass
        elif self.path == "/slow":
            time.sleep(3)
            self._send(self.photo)
        else:
            self.send_error(404)

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def image_server():
    _ImageHandler.photo = SHAPES.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def endpoint(ray_local, image_server):
    """``serve.run`` of the app (args as ``serve run`` passes them: strings); yields the HTTP port."""
    import socket

    from ray import serve

    from pipelines.serve import APP_NAME, app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_dir": str(MODEL_DIR), "max_batch_size": "2", "batch_wait_timeout_s": "0.25",
            "max_body_bytes": "2000000", "max_pixels": "4000000", "url_allowlist": f"127.0.0.1:{image_server}",
            "url_timeout_s": "1", "url_max_bytes": "1000000", "visualize": "false",
            "ray_actor_options": '{"num_cpus": 1}'}
    try:
        serve.run(app(args), name=APP_NAME, route_prefix="/")
        yield port
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def model():
    """The predictor the endpoint runs, in this process, with the replica's thread count."""
    from instseg_core import create_model

    return create_model(model_dir=str(MODEL_DIR), device="cpu", cpu_threads=1)


# ---------------------------------------------------------------------- the endpoint


def test_health(endpoint):
    status, body = _request(endpoint, "GET", "/health")
    assert status == 200 and body["errorCode"] == 0 and body["errorMsg"] == "Healthy"


def test_responses_equal_predict(endpoint, model):
    photos = sorted(COCO_IMAGES.glob("*.jpg"))[:1] if COCO_IMAGES.is_dir() else []
    cases = [(SHAPES, None), (SHAPES, 0.3), (SAMPLES / "shapes_1.jpg", None)] + [(p, None) for p in photos]
    for path, threshold in cases:
        payload = {"image": _b64(path)}
        if threshold is not None:
            payload["threshold"] = threshold
        status, body = _infer(endpoint, payload)
        assert status == 200, body
        assert body["errorCode"] == 0 and body["errorMsg"] == "Success" and body["logId"]
        assert body["result"]["image"] is None  # visualize=false in the app's settings
        assert body["result"]["instances"] == _expected(model, path, threshold), (path, threshold)
    assert _expected(model, SHAPES), "the demo image must give detections, else this test shows little"


def test_overlay_is_predicts_image_as_jpeg(endpoint, model):
    import io

    status, body = _infer(endpoint, {"image": _b64(SHAPES), "visualize": True})
    assert status == 200, body
    with io.BytesIO() as f:
        next(iter(model.predict(str(SHAPES)))).img["res"].save(f, format="JPEG")
        assert base64.b64decode(body["result"]["image"]) == f.getvalue()


def test_bad_requests_are_4xx_envelopes_and_the_next_good_one_works(endpoint, model):
    photo = SHAPES.read_bytes()
    big = cv2.imencode(".jpg", np.zeros((2000, 2500, 3), np.uint8))[1].tobytes()  # 5 MP > max_pixels 4 MP
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 422, "must be a JSON object"),
        ({"threshold": 0.5}, 422, "missing field: image"),
        ({"image": _b64(photo), "extra": 1}, 422, "unknown field(s): extra"),
        ({"image": 42}, 422, "image must be a string"),
        ({"image": ""}, 422, "empty"),
        ({"image": _b64(photo), "threshold": "0.5"}, 422, "threshold must be a number"),
        ({"image": _b64(photo), "threshold": True}, 422, "threshold must be a number"),
        ({"image": _b64(photo), "threshold": 1.5}, 422, "threshold must be in [0, 1]"),
        ({"image": _b64(photo), "threshold": -0.1}, 422, "threshold must be in [0, 1]"),
        ({"image": _b64(photo), "visualize": "yes"}, 422, "visualize must be"),
        ({"image": "not base64 at all!"}, 422, "valid base64"),
        ({"image": _b64(photo)[:-3]}, 422, "valid base64"),  # broken padding
        ({"image": _b64(b"hello, not an image")}, 422, "cannot decode"),
        ({"image": _b64(photo[: len(photo) // 2])}, 422, "truncated"),
        ({"image": _b64(big)}, 413, "more than max_pixels=4000000"),
        # headers claiming 9 MP / 400 MP with no pixel data: refused from the header (a decode says "corrupt")
        ({"image": _b64(_png_header_only(3000, 3000))}, 413, "3000x3000 = 9000000 pixels"),
        ({"image": _b64(_png_header_only(20000, 20000))}, 413, "more than max_pixels=4000000"),
        ({"image": "file:///etc/passwd"}, 422, "scheme 'file' is not supported"),
        ({"image": "http://example.invalid/a.jpg"}, 403, "not in url_allowlist"),
        (b'{"image": "' + b"A" * 2_100_000 + b'"}', 413, "max_body_bytes=2000000"),
    ]
    good = {"image": _b64(photo)}
    expected = _expected(model, SHAPES)
    for payload, code, words in cases:
        status, body = _infer(endpoint, payload)
        _assert_refused(status, body, code, words)
        status, body = _infer(endpoint, good)
        assert status == 200 and body["result"]["instances"] == expected
    # a chunked upload (no Content-Length) over the limit
    status, body = _infer(endpoint, b'{"image": "' + b"A" * 2_100_000 + b'"}', chunked=True)
    _assert_refused(status, body, 413, "max_body_bytes")
    # wrong method and unknown route: Serve's FastAPI answers with the same envelope
    _assert_refused(*_request(endpoint, "GET", "/instance-segmentation"), 405, "not allowed")
    _assert_refused(*_request(endpoint, "POST", "/nope", b"{}"), 404, "not found")
    status, body = _infer(endpoint, good)
    assert status == 200 and body["result"]["instances"] == expected


def test_two_concurrent_clients_share_a_batch(endpoint, model):
    from ray import serve

    from pipelines.serve import APP_NAME, DEPLOYMENT_NAME

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    payloads = [{"image": _b64(SHAPES)}, {"image": _b64(SAMPLES / "shapes_1.jpg")}]
    expected = [_expected(model, SHAPES), _expected(model, SAMPLES / "shapes_1.jpg")]
    for _attempt in range(3):  # 0.25 s of batch wait: a loaded machine could still split them
        seen = len(handle.recent_batch_sizes.remote().result()["sizes"])  # one replica
        barrier = threading.Barrier(2)
        answers: list = [None, None]

        def client(i: int) -> None:
            barrier.wait()
            answers[i] = _infer(endpoint, payloads[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [a[0] for a in answers] == [200, 200], answers
        assert [a[1]["result"]["instances"] for a in answers] == expected
        sizes = handle.recent_batch_sizes.remote().result()["sizes"][seen:]
        if 2 in sizes:
            break
    assert 2 in sizes, f"batch sizes the replica saw: {sizes}"


def test_url_inputs_only_from_allowlisted_hosts(endpoint, image_server, model):
    base = f"http://127.0.0.1:{image_server}"
    status, body = _infer(endpoint, {"image": f"{base}/img.jpg"})
    assert status == 200, body
    assert body["result"]["instances"] == _expected(model, SHAPES)
    status, body = _infer(endpoint, {"image": f"{base}/redirect-same-host"})
    assert status == 200, body
    refused = [
        (f"http://localhost:{image_server}/img.jpg", 403, "not in url_allowlist"),  # same server, other name
        (f"{base}/redirect-out", 403, "not in url_allowlist"),
        (f"http://127.0.0.1:{image_server + 1 if image_server < 65535 else 1}/img.jpg", 403, "not in url_allowlist"),
        (f"{base}/missing.jpg", 422, "HTTP 404"),
        (f"{base}/big", 413, "url_max_bytes=1000000"),
        (f"{base}/big-unsized", 413, "url_max_bytes=1000000"),
        (f"{base}/slow", 422, "within 1 s"),
    ]
    for url, code, words in refused:
        _assert_refused(*_infer(endpoint, {"image": url}), code, words)
    status, body = _infer(endpoint, {"image": f"{base}/img.jpg"})
    assert status == 200


# ---------------------------------------------------------------------- settings (no Ray)


def test_settings_from_cli_strings_and_errors_naming_the_key():
    from pipelines.serve_settings import ServeSettings, ServeSettingsError

    s = ServeSettings.from_args({"model_dir": str(MODEL_DIR), "max_batch_size": "4", "threshold": "0.4",
                                 "url_allowlist": "a.example.com, 10.0.0.5:8080", "visualize": "no",
                                 "ray_actor_options": '{"num_cpus": 2, "num_gpus": 0.5}'})
    assert (s.max_batch_size, s.threshold, s.visualize) == (4, 0.4, False)
    assert s.url_allowlist == ("a.example.com", "10.0.0.5:8080")
    assert (s.replica_device, s.replica_cpu_threads, s.ongoing_requests) == ("gpu", 2, 8)
    assert s.deployment_options()["num_replicas"] == 1
    auto = ServeSettings.from_args({"model_name": "PP-YOLOE_seg-S",
                                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}})
    assert "num_replicas" not in auto.deployment_options()
    hpi = ServeSettings.from_args({"model_dir": str(MODEL_DIR), "use_hpip": "true",
                                   "hpi_config": "{'backend': 'openvino'}"})  # serve run's strings
    assert hpi.use_hpip and hpi.hpi_config == {"backend": "openvino", "backend_config": {}, "auto_config": True}
    bad = [
        ({"model_dir": str(MODEL_DIR), "max_batchsize": 4}, "unknown serve setting(s): max_batchsize"),
        ({"model_dir": str(MODEL_DIR), "threshold": "1.5"}, "threshold"),
        ({"model_dir": str(MODEL_DIR), "max_batch_size": "0"}, "max_batch_size"),
        ({"model_dir": str(MODEL_DIR), "ray_actor_options": {"num_cpu": 1}}, "num_cpu"),
        ({"model_dir": str(MODEL_DIR), "url_allowlist": ["http://a.com/x"]}, "url_allowlist"),
        ({"model_dir": str(MODEL_DIR), "num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}, "not both"),
        ({"model_dir": str(MODEL_DIR), "autoscaling_config": {"max_replicas": "many"}}, "autoscaling_config"),
        ({"model_dir": str(MODEL_DIR), "device": "gpu"}, "num_gpus"),
        ({"model_dir": str(MODEL_DIR), "max_ongoing_requests": 2, "max_batch_size": 8}, "max_ongoing_requests"),
        ({"model_dir": "/no/such/dir"}, "model_dir"),
        ({}, "model_dir=<inference dir> or model_name"),
        ({"model_dir": str(MODEL_DIR), "hpi_config": "{'backend': 'fast'}"}, "hpi_config: unknown hpi backend"),
    ]
    for args, words in bad:
        with pytest.raises(ServeSettingsError, match=None) as info:
            ServeSettings.from_args(args)
        assert words in str(info.value), (args, str(info.value))


def test_allowlist_is_an_exact_host_match():
    from pipelines.serve_fetch import allowed_host

    allow = ("images.example.com", "127.0.0.1:8080")
    assert allowed_host("https://images.example.com/a.jpg", allow)
    assert allowed_host("https://IMAGES.example.com:443/a.jpg", allow)
    assert allowed_host("http://127.0.0.1:8080/a.jpg", allow)
    for url in ("https://images.example.com.evil.net/a.jpg", "https://evil.net/images.example.com/a.jpg",
                "https://images.example.com@evil.net/a.jpg", "http://127.0.0.1:8081/a.jpg", "http://127.0.0.1/a.jpg",
                "ftp://images.example.com/a.jpg", "file://images.example.com/etc/passwd", "http://[::1]:8080/"):
        assert not allowed_host(url, allow), url


def test_serve_config_file_and_cli_errors():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve_settings import ServeSettings

    config = yaml.safe_load((REPO / "cluster" / "serve" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert [a.import_path for a in schema.applications] == ["pipelines.serve:app"]
    settings = ServeSettings.from_args(config["applications"][0]["args"])
    assert settings.url_allowlist == () and settings.num_gpus == 0.5
    # `serve run` with a bad value stops before Ray starts, naming the key
    proc = subprocess.run([str(Path(sys.executable).parent / "serve"), "run", "pipelines.serve:app",
                           f"model_dir={MODEL_DIR}", "max_batch_size=many"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    assert "max_batch_size must be an integer >= 1, got 'many'" in proc.stderr


def test_result_entries_for_box_models_and_solov2():
    """PaddleX's mapping of a result to ``instances``: the box model's mask cropped to the rounded box;
    SOLOv2 (PaddleX's app has no branch for it) gets the mask's extent and the full-image mask."""
    from instseg_core.masks import masks_to_xyxy
    from instseg_core.structures import Instances
    from pipelines.serve_protocol import build_result

    h, w = 20, 30
    masks = np.zeros((2, h, w), bool)
    masks[0, 2:8, 3:10] = True
    masks[1, 10:15, 0:5] = True
    image = np.zeros((h, w, 3), np.uint8)

    def rle(m: np.ndarray) -> str:
        return mask_util.encode(np.asfortranarray(m[..., None].astype(np.uint8)))[0]["counts"].decode()

    boxes = Instances([[3.4, 2, 9.6, 8], [0, 10, 5, 15]], [0.9, 0.6], [1, 0], masks, (h, w))
    got = build_result(boxes, ["a", "b"], image, visualize=False)
    assert got["image"] is None
    first = got["instances"][0]
    assert first["bbox"] == [float(np.float32(3.4)), 2.0, float(np.float32(9.6)), 8.0]
    assert (first["categoryId"], first["categoryName"], first["score"]) == (1, "b", float(np.float32(0.9)))
    assert first["mask"] == {"rleResult": rle(masks[0][2:8, 3:10]), "size": [6, 7]}  # x: round(3.4)..round(9.6)
    assert got["instances"][1]["bbox"][0] == 0 and isinstance(got["instances"][1]["bbox"][0], int)  # clip bound

    solo = Instances(masks_to_xyxy(masks), [0.9, 0.6], [1, 0], masks, (h, w), boxes_from_masks=True)
    got = build_result(solo, ["a", "b"], image, visualize=True)
    assert got["instances"][0]["bbox"] == [3, 2, 10, 8]
    assert got["instances"][0]["mask"] == {"rleResult": rle(masks[0]), "size": [h, w]}
    assert base64.b64decode(got["image"])[:2] == b"\xff\xd8"  # a JPEG
