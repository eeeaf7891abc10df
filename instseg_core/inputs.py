"""Prediction inputs -> decoded BGR images.

Accepted inputs (PaddleX 3.x's, plus remote storage):

* a local image file (decoded by content, whatever its suffix: PaddleX insists on a known suffix,
  but a file that decodes is an image, and one that does not gets a clear error either way);
* a local directory: walked recursively, files with an image suffix (``IMAGE_SUFFIXES``), sorted;
* an ``http://`` / ``https://`` URL: downloaded into memory (PaddleX writes every download to the
  same ``~/.paddlex/predict_input/<name>``, which concurrent runs overwrite); ``input_path`` stays
  the URL, so output names still come from its file name;
* any other fsspec URL (``s3://bucket/key``, ``memory://...``, ``file://...``): a file, or a
  directory / prefix expanded like a local directory;
* a numpy array: BGR HWC uint8 (HxW gray, HxWx1 and HxWx4 BGRA are converted; uint16 is scaled);
* a list or tuple of any of these (nested lists are flattened).

Anything else raises ``InputError`` (PaddleX skips it with a warning; a skipped image is a lost one).

Decoding (``decode_image_pages``): OpenCV with ``IMREAD_COLOR | IMREAD_ANYDEPTH``, which applies
JPEG EXIF orientation, turns gray into 3-channel BGR and drops alpha channels (the colour values
are kept as stored, not composited, as PaddleX's ``cv2.imread(IMREAD_COLOR)`` does). 16-bit
images are scaled to 8 bit by ``/257`` with rounding. Every page of a TIFF is its own image with
``page_index`` 0..n-1 (single-page TIFFs too, as in PaddleX 3.7.2). JPEG and PNG data are checked
for their end marker first, because OpenCV decodes a truncated file into a partly grey image with
only a warning. PDF is not supported.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator

import cv2
import numpy as np

from instseg_core.io import is_http, read_uri, redact, url_to_fs

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff",
    ".pbm", ".pgm", ".ppm", ".pnm", ".dib", ".sr", ".ras",
)  # lower case, with the dot; matched case-insensitively

DOWNLOAD_TIMEOUT_S = 60.0

_DECODE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH  # keep 16-bit depth so we can scale it properly


@dataclass
class ImageItem:
    """One decoded image: BGR HWC uint8, where it came from, and its page in a multi-page file."""

    image: np.ndarray
    input_path: str | None
    page_index: int | None = None


class InputError(ValueError):
    """An input that cannot be turned into an image; the message names the input and the cause.

    ``kind`` is a short machine-readable cause (``not_found``, ``read_error``, ``empty``,
    ``truncated``, ``corrupt``, ``unsupported``, ``invalid``) that pipelines count by.
    """

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


def has_image_suffix(name: str) -> bool:
    """True when ``name`` ends with one of ``IMAGE_SUFFIXES`` (any case)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


# ---------------------------------------------------------------------- expanding inputs


def iter_input_items(inputs: Any) -> Iterator[str | np.ndarray]:
    """Expand ``inputs`` into single items (file paths, URLs, arrays), lazily and in order.

    Directories and fsspec prefixes become their image files, sorted; lists are flattened.
    """
    if isinstance(inputs, (list, tuple)):
        for element in inputs:
            yield from iter_input_items(element)
    elif isinstance(inputs, np.ndarray):
        yield inputs
    elif isinstance(inputs, (str, os.PathLike)):
        yield from _expand_location(os.fspath(inputs))
    else:
        raise InputError(
            f"unsupported input {_short_repr(inputs)} of type {type(inputs).__name__}: "
            "expected a path, URL, numpy array, or a list of these"
        )


def _expand_location(location: str) -> Iterator[str]:
    if is_http(location):
        yield location
    elif "://" in location:
        yield from _expand_fsspec(location)
    elif os.path.isdir(location):
        yield from _list_local_dir(location)
    else:
        yield location  # missing files are reported when loaded, in input order


def _list_local_dir(directory: str) -> list[str]:
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if has_image_suffix(name)
    ]
    if not files:
        raise InputError(f"no image files found in {directory}", "not_found")
    return sorted(files)


def _expand_fsspec(url: str) -> list[str]:
    try:
        fs, path = url_to_fs(url)
        # An image suffix means a file: skip the isdir round trip (one request per object on S3).
        if has_image_suffix(path) or not fs.isdir(path):
            return [url]
        files = sorted(p for p in fs.find(path) if has_image_suffix(p))
    except Exception as exc:  # noqa: BLE001 - any backend error becomes a named input error
        raise InputError(f"cannot list {url}: {exc}", "read_error") from exc
    if not files:
        raise InputError(f"no image files found in {url}", "not_found")
    return [fs.unstrip_protocol(p) for p in files]


# ---------------------------------------------------------------------- loading


def read_inputs(inputs: Any) -> Iterator[ImageItem]:
    """Decoded images for ``inputs`` (see the module docstring), one per image or TIFF page, lazily."""
    for item in iter_input_items(inputs):
        yield from load_pages(item)


def load_image(item: str | np.ndarray) -> ImageItem:
    """Decode one item (path, URL or array); for a multi-page TIFF, its first page."""
    return next(iter(load_pages(item)))


def load_pages(item: str | np.ndarray) -> list[ImageItem]:
    """Decode one item into its images: one, or one per page for TIFF."""
    if isinstance(item, np.ndarray):
        return [ImageItem(_array_to_bgr(item), None)]
    if not isinstance(item, (str, os.PathLike)):
        raise InputError(f"unsupported input {_short_repr(item)} of type {type(item).__name__}", "unsupported")
    location = os.fspath(item)
    data = read_bytes(location)
    pages = decode_image_pages(data, location)
    if _is_tiff_data(data):  # every TIFF page is numbered, even a lone one (PaddleX 3.7.2 does)
        return [ImageItem(page, location, i) for i, page in enumerate(pages)]
    return [ImageItem(pages[0], location)]


def read_bytes(location: str) -> bytes:
    """The raw bytes of a local path, http(s) URL or fsspec URL; errors name the location."""
    if is_http(location):
        return _download(location)
    if "://" in location:
        return _read_fsspec(location)
    if os.path.isdir(location):
        raise InputError(f"{location} is a directory; use read_inputs() to expand it")
    try:
        with open(location, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{location} does not exist", "not_found") from None
    except OSError as exc:
        raise InputError(f"cannot read {location}: {exc.strerror or exc}", "read_error") from exc


def _http_request(url: str) -> urllib.request.Request:
    """A GET for ``url``; a ``user:password@`` part becomes a Basic ``Authorization`` header
    (urllib would take it for part of the host name)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
    plain = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return urllib.request.Request(plain, headers={"Authorization": f"Basic {token}"})


def _download(url: str) -> bytes:
    shown = redact(url)  # messages never carry credentials or signatures
    try:
        with urllib.request.urlopen(_http_request(url), timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise InputError(f"cannot download {shown}: HTTP {exc.code} {exc.reason}",
                         "not_found" if exc.code == 404 else "read_error") from None
    except urllib.error.URLError as exc:
        raise InputError(f"cannot download {shown}: {exc.reason}", "read_error") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        raise InputError(f"cannot download {shown}: {redact(str(exc))}", "read_error") from None


def _read_fsspec(url: str) -> bytes:
    try:
        return read_uri(url)
    except FileNotFoundError:
        raise InputError(f"{url} does not exist", "not_found") from None
    except Exception as exc:  # noqa: BLE001 - backends raise many types; name the input
        raise InputError(f"cannot read {url}: {exc}", "read_error") from exc


# ---------------------------------------------------------------------- decoding


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode an encoded image to BGR HWC uint8 (first page of a multi-page TIFF).

    ``name`` only labels errors. Raises ``InputError`` for empty, truncated or undecodable data.
    """
    return decode_image_pages(data, name)[0]


def decode_image_pages(data: bytes, name: str) -> list[np.ndarray]:
    """Decode an encoded image into its pages (one unless it is a multi-page TIFF), BGR HWC uint8."""
    if len(data) == 0:
        raise InputError(f"{name} is empty (0 bytes)", "empty")
    problem = _truncation_problem(data)
    if problem:
        raise InputError(f"cannot decode {name} as an image: {problem}", "truncated")
    if data.startswith(b"%PDF"):
        raise InputError(f"cannot decode {name} as an image: PDF input is not supported", "unsupported")
    buffer = np.frombuffer(data, dtype=np.uint8)
    multi = _is_tiff_data(data)
    pages = _cv_decode(buffer, multi, _DECODE_FLAGS)
    if any(p.dtype not in (np.uint8, np.uint16) for p in pages):
        # Float or other exotic depths: let OpenCV's own 8-bit conversion decide, as PaddleX does.
        pages = _cv_decode(buffer, multi, cv2.IMREAD_COLOR)
    if not pages:
        raise InputError(f"cannot decode {name} as an image: unknown format or corrupt data", "corrupt")
    return [_to_bgr8(page) for page in pages]


def _cv_decode(buffer: np.ndarray, multi: bool, flags: int) -> list[np.ndarray]:
    if multi:
        ok, pages = cv2.imdecodemulti(buffer, flags)
        return list(pages) if ok else []
    image = cv2.imdecode(buffer, flags)
    return [] if image is None else [image]


def _scale16(image: np.ndarray) -> np.ndarray:
    # /257 maps 0..65535 onto 0..255 exactly (65535 = 255 * 257); +128 rounds to nearest.
    return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _to_bgr8(image: np.ndarray) -> np.ndarray:
    """Bring a decoded page to 3-channel uint8."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return _scale16(image) if image.dtype == np.uint16 else image


def _truncation_problem(data: bytes) -> str | None:
    """Why JPEG/PNG ``data`` is incomplete, or None (other formats are left to the decoder)."""
    if data.startswith(b"\xff\xd8") and not _jpeg_has_eoi(data):
        return "truncated JPEG data (no end-of-image marker)"
    if data.startswith(b"\x89PNG\r\n\x1a\n") and not _png_has_iend(data):
        return "truncated PNG data (no IEND chunk)"
    return None


def _jpeg_has_eoi(data: bytes) -> bool:
    """Walk the JPEG markers up to EOI (FFD9); bytes after it (trailers, motion photos) are fine.

    Segments are skipped by their length so that an EOI inside an EXIF thumbnail does not count;
    entropy-coded data cannot contain a bare marker (FF is stuffed as FF00), so searching for the
    next FF finds the next marker there.
    """
    pos, n = 2, len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            return False
        marker = data[pos + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # stuffing, TEM, RSTn: no length
            pos += 2
        else:
            if pos + 4 > n:
                return False
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")


def _png_has_iend(data: bytes) -> bool:
    """Walk the PNG chunks (length, type, data, CRC) up to IEND; trailing bytes are fine."""
    pos, n = 8, len(data)
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IEND":
            return pos + 12 <= n
        pos += 12 + length
    return False


def _is_tiff_data(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def _array_to_bgr(array: np.ndarray) -> np.ndarray:
    """Validate an in-memory image and bring it to BGR HWC uint8 (BGR/BGRA/gray assumed)."""
    if array.size == 0:
        raise InputError(f"numpy array input of shape {array.shape} is empty")
    if array.dtype == np.uint16:
        array = _scale16(array)
    elif array.dtype != np.uint8:
        raise InputError(f"numpy array input has dtype {array.dtype}; expected uint8 (BGR image)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    if array.ndim == 3 and array.shape[2] == 4:
        return np.ascontiguousarray(array[:, :, :3])  # drop alpha, like the file decoder
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    raise InputError(f"numpy array input has shape {array.shape}; expected HxWx3 (BGR), HxW, HxWx1 or HxWx4")


def _short_repr(obj: Any, limit: int = 60) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = [
    "IMAGE_SUFFIXES", "ImageItem", "InputError", "decode_image_bytes", "decode_image_pages",
    "has_image_suffix", "iter_input_items", "load_image", "load_pages", "read_bytes", "read_inputs",
]
