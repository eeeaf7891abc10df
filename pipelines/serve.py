"""The online endpoint: a Ray Serve application speaking PaddleX's instance-segmentation protocol.

    serve run pipelines.serve:app model_dir=samples/model
    serve run pipelines.serve:app model_name=PP-YOLOE_seg-S max_batch_size=8 url_allowlist=images.example.com
    serve deploy cluster/serve/serve_config.yaml

Routes: ``POST /instance-segmentation`` (``pipelines.serve_protocol``), ``GET /health``. Each
replica loads the model once. A request is read (``max_body_bytes``), checked, its image fetched
(allow-listed URLs only, ``pipelines.serve_fetch``) or base64-decoded, its pixel count checked from
the header and then decoded, all concurrently with the running batch; only decoded images enter
the dynamic batch (``@serve.batch``), which runs the predictor on arrays in one thread of its own.
A refused request is a 4xx with PaddleX's error envelope and costs the replica nothing else.
Settings: :class:`pipelines.serve_settings.ServeSettings`.
"""

# No `from __future__ import annotations` here: FastAPI must see the routes' `Request` annotation as
# a class, and Serve's class-based ingress rebuilds the signatures where strings do not resolve.
import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pipelines import serve_protocol as proto
from pipelines.serve_fetch import fetch_image, new_session
from pipelines.serve_settings import ServeSettings

log = logging.getLogger("instseg")

APP_NAME = "instseg"
DEPLOYMENT_NAME = "InstanceSegmentation"
# Images above this many pixels come out of the predictor as RLE (encoded one mask at a time)
# instead of dense masks: N dense full-size masks of a 40 MP photo would not fit in memory.
_DENSE_MASK_PIXELS = 1333 * 1333
_RECENT_BATCHES = 1000

api = FastAPI(title="instseg instance segmentation", docs_url=None, redoc_url=None, openapi_url=None)


def _json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(content=proto.to_json_bytes(payload), status_code=status, media_type="application/json")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:  # unknown route, wrong method
    return _json_response(proto.failure(proto.new_log_id(), exc.status_code, str(exc.detail)), exc.status_code)


@dataclass
class _Job:
    """One decoded image waiting for the batch, with its effective threshold."""

    image: np.ndarray
    threshold: float


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class InstanceSegmentationServer:
    """One replica: the model, its batch queue, and the HTTP routes."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        # Paddle runs in one thread for the replica's life (the model is built there too): its
        # per-thread state is made once, and batches never overlap on one predictor.
        self._predict_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instseg-predict")
        self.model = self._predict_thread.submit(self._load_model).result()
        self.labels = tuple(self.model.labels)
        self._predict_batch.set_max_batch_size(settings.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._session = None  # aiohttp session, made on the replica's event loop at first use
        self._recent_batches: collections.deque[int] = collections.deque(maxlen=_RECENT_BATCHES)
        self._requests = Counter("instseg_serve_requests", description="Requests answered, by errorCode "
                                 "(0: success, else the HTTP status).", tag_keys=("error_code",))
        self._batch_images = Histogram("instseg_serve_batch_images", description="Images per predictor batch.",
                                       boundaries=[1, 2, 4, 8, 16, 32, 64])
        log.info("instseg serve: model %s loaded from %s", self.model.model_name, self.model.model_dir.path)

    def _load_model(self):
        from instseg_core import create_model
        from pipelines.model_source import local_model_dir

        s = self.settings
        model_dir = local_model_dir(s.model_dir) if s.model_dir else None
        return create_model(s.model_name, model_dir, device=s.replica_device, threshold=s.threshold,
                            cpu_threads=s.replica_cpu_threads, max_mask_side=s.max_mask_side,
                            use_hpip=s.use_hpip or s.hpi_config is not None, hpi_config=s.hpi_config)

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> Response:
        """200 once the model is loaded (a replica is only routed to after ``__init__``)."""
        return _json_response(proto.health(proto.new_log_id()))

    @api.post(proto.INFER_PATH)
    async def infer(self, request: Request) -> Response:
        """PaddleX's ``infer`` operation for one image."""
        log_id = proto.new_log_id()
        try:
            body = await self._read_body(request)
            req = proto.parse_request(body)
            del body
            data = await self._image_bytes(req)
            image = await asyncio.to_thread(proto.decode_image, data, self.settings.max_pixels)
            del data
            threshold = self.model.effective_threshold(req.threshold)
            outcome = await self._predict_batch(_Job(image, threshold))
            if isinstance(outcome, BaseException):
                raise outcome
            visualize = self.settings.visualize if req.visualize is None else req.visualize
            result = await asyncio.to_thread(proto.build_result, outcome, self.labels, image, visualize)
            payload, status = proto.success(log_id, result), 200
        except proto.RequestError as e:
            payload, status = proto.failure(log_id, e.status, e.message), e.status
        except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing to log
            payload, status = proto.failure(log_id, 400, "client disconnected"), 400
        except Exception:  # noqa: BLE001 - a server fault: logged, answered as PaddleX does
            log.exception("instseg serve: request %s failed", log_id)
            payload, status = proto.failure(log_id, 500, "Internal server error"), 500
        self._requests.inc(tags={"error_code": str(payload["errorCode"])})
        return _json_response(payload, status)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise proto.RequestError(413, f"request body is {declared} bytes, more than max_body_bytes={limit}")
        chunks, total = [], 0
        async for chunk in request.stream():  # counts chunked uploads too
            total += len(chunk)
            if total > limit:
                raise proto.RequestError(413, f"request body is more than max_body_bytes={limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _image_bytes(self, req: proto.InferRequest) -> bytes:
        s = self.settings
        if req.is_url:
            if self._session is None:
                self._session = new_session()
            return await fetch_image(self._session, req.image, s.url_allowlist, s.url_timeout_s, s.url_max_bytes)
        if len(req.image) > 64 * 1024:  # large payloads off the event loop
            return await asyncio.to_thread(proto.decode_base64, req.image)
        return proto.decode_base64(req.image)

    # ------------------------------------------------------------------ batching

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # real values set in __init__
    async def _predict_batch(self, jobs: list[_Job]) -> list[Any]:
        self._recent_batches.append(len(jobs))
        self._batch_images.observe(len(jobs))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._predict_thread, self._run_batch, jobs)

    def _run_batch(self, jobs: list[_Job]) -> list[Any]:
        """Predict a batch: one predictor call per (threshold, mask form) group; when a call fails,
        its images are retried alone, so one failing image fails only its own request."""
        results: list[Any] = [None] * len(jobs)
        groups: dict[tuple[float, bool], list[int]] = collections.defaultdict(list)
        for i, job in enumerate(jobs):
            h, w = job.image.shape[:2]
            groups[(job.threshold, h * w > _DENSE_MASK_PIXELS)].append(i)
        for (threshold, rle), members in groups.items():
            try:
                outputs = self.model.predict_arrays([jobs[i].image for i in members], threshold, rle=rle)
                for i, out in zip(members, outputs):
                    results[i] = out
            except Exception as e:  # noqa: BLE001 - isolate the culprit below
                if len(members) == 1:
                    results[members[0]] = e
                    continue
                for i in members:
                    try:
                        results[i] = self.model.predict_arrays([jobs[i].image], threshold, rle=rle)[0]
                    except Exception as single:  # noqa: BLE001 - this image's own failure
                        results[i] = single
        return results

    # ------------------------------------------------------------------ introspection (handles)

    def recent_batch_sizes(self) -> dict[str, Any]:
        """``{"replica": id, "sizes": [...]}``: the sizes of the last batches this replica ran, oldest
        first (for tests, benchmarks and debugging through a deployment handle)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, "sizes": list(self._recent_batches)}

    async def __del__(self) -> None:
        if self._session is not None:
            await self._session.close()


def build_app(settings: ServeSettings) -> serve.Application:
    """The Serve application for ``settings``."""
    return InstanceSegmentationServer.options(**settings.deployment_options()).bind(settings)


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run pipelines.serve:app key=value ...`` and ``serve deploy``
    configs (``args:``); keys are :class:`~pipelines.serve_settings.ServeSettings` fields."""
    return build_app(ServeSettings.from_args(args))


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "InstanceSegmentationServer", "app", "build_app"]
