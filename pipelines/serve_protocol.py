"""PaddleX's serving protocol for ``/instance-segmentation``: requests in, envelopes out.

What PaddleX 3.7.2 serves (``paddlex/inference/serving``, instance-segmentation app), and this
module reproduces:

* request ``{"image": <base64 file bytes or http(s) URL>, "threshold"?: float, "visualize"?: bool}``;
* success ``{"logId": uuid4, "errorCode": 0, "errorMsg": "Success", "result": {"instances": [...],
  "image": <base64 JPEG overlay or null>}}``, one instance per entry of the PaddleX result's
  ``boxes``: ``bbox`` (its ``coordinate``), ``categoryId`` (``cls_id``), ``categoryName``
  (``label``), ``score``, and ``mask = {"rleResult": COCO RLE counts string, "size": [h, w]}`` of
  the result's mask **cropped to the rounded box** (``result["masks"]``), not the full-image mask;
* errors ``{"logId", "errorCode": <HTTP status>, "errorMsg": <text>}`` with that HTTP status.
  PaddleX leaves ``result`` out of errors; here it is present as ``null`` (clients that read
  ``errorCode`` see no difference).

Where this module is stricter than PaddleX (which takes any JSON object, ignores unknown keys,
coerces ``"0.5"`` to a float, decodes base64 leniently and answers 500 for an undecodable image):
unknown keys, wrong types, a threshold outside [0, 1], bad base64, undecodable data and images
over the pixel limit are 4xx errors naming the problem. SOLOv2 results (no boxes in PaddleX,
whose app fails on them) get the mask's extent as ``bbox`` and the full-image mask.

No Ray here: the deployment in ``pipelines/serve.py`` calls these functions.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from instseg_core.inputs import InputError, decode_image_bytes
from instseg_core.masks import encode_rle
from instseg_core.results import InstanceSegResult
from instseg_core.structures import Instances
from instseg_core.visualize import draw_instances

INFER_PATH = "/instance-segmentation"
REQUEST_FIELDS = ("image", "threshold", "visualize")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WHITESPACE = re.compile(rb"\s+")


class RequestError(Exception):
    """A request the endpoint refuses: ``status`` (4xx) is both the HTTP status and ``errorCode``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InferRequest:
    """A checked request: ``image`` is base64 text or an http(s) URL (see :attr:`is_url`)."""

    image: str
    threshold: float | None = None
    visualize: bool | None = None

    @property
    def is_url(self) -> bool:
        return self.image[:8].lower().startswith(("http://", "https://"))


def new_log_id() -> str:
    return str(uuid.uuid4())


def success(log_id: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"logId": log_id, "errorCode": 0, "errorMsg": "Success", "result": result}


def failure(log_id: str, status: int, message: str) -> dict[str, Any]:
    return {"logId": log_id, "errorCode": status, "errorMsg": message, "result": None}


def health(log_id: str) -> dict[str, Any]:
    """PaddleX's ``GET /health`` answer."""
    return {"logId": log_id, "errorCode": 0, "errorMsg": "Healthy"}


def to_json_bytes(payload: dict[str, Any]) -> bytes:
    # repr-exact floats (json's default), so clients see the predictor's float32 values exactly
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------- requests


def parse_request(body: bytes) -> InferRequest:
    """Check a request body; raises :class:`RequestError` (400 not JSON, 422 bad fields)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(k for k in data if k not in REQUEST_FIELDS)
    if unknown:
        raise RequestError(422, f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(REQUEST_FIELDS)}")
    if "image" not in data:
        raise RequestError(422, "missing field: image (base64-encoded image file or http(s) URL)")
    image = data["image"]
    if not isinstance(image, str):
        raise RequestError(422, f"image must be a string (base64 or URL), got {_json_type(image)}")
    if not image.strip():
        raise RequestError(422, "image is an empty string")
    threshold = data.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise RequestError(422, f"threshold must be a number in [0, 1], got {_json_type(threshold)}")
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise RequestError(422, f"threshold must be in [0, 1], got {threshold!r}")
        threshold = float(threshold)
    visualize = data.get("visualize")
    if visualize is not None and not isinstance(visualize, bool):
        raise RequestError(422, f"visualize must be true, false or null, got {_json_type(visualize)}")
    image = image.strip()
    if _SCHEME.match(image) and not image[:8].lower().startswith(("http://", "https://")):
        scheme = image.split("://", 1)[0]
        raise RequestError(422, f"image: URL scheme {scheme!r} is not supported (only http and https)")
    return InferRequest(image=image, threshold=threshold, visualize=visualize)


def decode_base64(text: str) -> bytes:
    """The file bytes of base64 ``text`` (standard alphabet, padding required, whitespace ignored)."""
    raw = _WHITESPACE.sub(b"", text.encode("ascii", errors="replace"))
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(422, f"image is neither an http(s) URL nor valid base64: {e}") from None
    if not data:
        raise RequestError(422, "image decodes to 0 bytes")
    return data


def header_pixels(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` read from the file's header without decoding it, or None when Pillow
    does not know the format (the decoder then has the last word). Pillow refuses headers over
    twice its ``MAX_IMAGE_PIXELS`` (a decompression bomb) with :class:`PIL.Image.DecompressionBombError`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError:
        raise
    except Exception:  # noqa: BLE001 - unknown or broken header: leave it to the decoder
        return None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Check the pixel count from the header, then decode to BGR uint8 (first page of a TIFF),
    as the predictor's inputs do (EXIF orientation applied, gray/alpha/16-bit converted)."""
    try:
        size = header_pixels(data)
    except Image.DecompressionBombError:
        raise RequestError(413, f"image has more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels (its header "
                                f"says so), more than max_pixels={max_pixels}") from None
    if size is not None:
        _check_pixels(size[0], size[1], max_pixels)
    try:
        image = decode_image_bytes(data, "the image data")
    except InputError as e:
        raise RequestError(422, str(e)) from None
    _check_pixels(image.shape[1], image.shape[0], max_pixels)  # formats Pillow could not read
    return image


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise RequestError(413, f"image has {width}x{height} = {width * height} pixels, "
                                f"more than max_pixels={max_pixels}")


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------- responses


def build_result(instances: Instances, labels: Sequence[str], image: np.ndarray, visualize: bool) -> dict[str, Any]:
    """The ``result`` object for one image, from the same PaddleX-format result ``predict`` yields."""
    res = InstanceSegResult(input_path=None, page_index=None, input_img=image, instances=instances, labels=labels)
    items = []
    for i, (entry, mask) in enumerate(zip(res["boxes"], res["masks"])):
        if "coordinate" in entry:
            bbox = entry["coordinate"]
            category = entry["cls_id"]
        else:  # SOLOv2: the mask's extent, as the "rle" result format gives it
            bbox = [int(round(float(v))) for v in instances.boxes[i]]
            category = entry["class_id"]
        items.append({"bbox": bbox, "categoryId": category, "categoryName": entry["label"],
                      "score": entry["score"], "mask": crop_rle(mask)})
    overlay = None
    if visualize:
        overlay = base64.b64encode(jpeg_bytes(draw_instances(image, instances, labels))).decode("ascii")
    return {"instances": items, "image": overlay}


def crop_rle(mask: np.ndarray) -> dict[str, Any]:
    """PaddleX's ``mask`` entry: COCO RLE counts of a (cropped) uint8 mask and its ``[h, w]``."""
    h, w = mask.shape
    return {"rleResult": encode_rle(mask[None])[0]["counts"], "size": [h, w]}


def jpeg_bytes(image: Image.Image) -> bytes:
    """What PaddleX sends as the overlay: Pillow's JPEG at its default quality."""
    with io.BytesIO() as f:
        image.save(f, format="JPEG")
        return f.getvalue()
