"""Inputs: every accepted kind decodes to BGR uint8, and every failure names the item and cause."""

from __future__ import annotations

import functools
import io
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest
from PIL import Image

from instseg_core.inputs import (
    IMAGE_SUFFIXES,
    ImageItem,
    InputError,
    decode_image_bytes,
    iter_input_items,
    load_image,
    read_inputs,
)


def _bgr(h: int = 12, w: int = 16) -> np.ndarray:
    """A BGR image with distinct quadrants (blue, green, red, white)."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2:] = (0, 255, 0)
    img[h // 2:, : w // 2] = (0, 0, 255)
    img[h // 2:, w // 2:] = (255, 255, 255)
    return img


def _png_bytes(img: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".png", img)
    assert ok
    return enc.tobytes()


def _write_png(path: Path, img: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(_bgr() if img is None else img))
    return path


def _jpeg_bytes(img_rgb: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_rgb).save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


# ----------------------------------------------------------------------------- accepted kinds


def test_local_png_file(tmp_path):
    path = _write_png(tmp_path / "a.png")
    item = load_image(str(path))
    assert isinstance(item, ImageItem)
    assert item.input_path == str(path) and item.page_index is None
    assert item.image.dtype == np.uint8 and np.array_equal(item.image, _bgr())


def test_pathlike_and_unknown_suffix_decoded_by_content(tmp_path):
    path = tmp_path / "image.data"
    path.write_bytes(_png_bytes(_bgr()))
    [item] = list(read_inputs(path))
    assert item.input_path == str(path) and np.array_equal(item.image, _bgr())


def test_directory_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b.png", "a/z.JPG", "a/c.png", "c.bmp", "sub/deep/x.tiff"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, enc = cv2.imencode(Path(rel).suffix.lower(), _bgr())
        path.write_bytes(enc.tobytes())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "meta.json").write_text("{}")
    items = list(iter_input_items(str(tmp_path)))
    expected = sorted(str(tmp_path / r) for r in ["b.png", "a/z.JPG", "a/c.png", "c.bmp", "sub/deep/x.tiff"])
    assert items == expected
    decoded = list(read_inputs(str(tmp_path)))
    assert [d.input_path for d in decoded] == expected
    assert all(d.image.shape == (12, 16, 3) for d in decoded)


def test_empty_directory(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match=r"no image files found in .*"):
        list(read_inputs(str(tmp_path)))


def test_suffixes_are_lowercase_with_dot():
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ras", ".sr"} <= set(IMAGE_SUFFIXES)


@pytest.fixture()
def http_root(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1; yields (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_url(http_root):
    root, base = http_root
    _write_png(root / "img" / "pic.png")
    url = f"{base}/img/pic.png"
    item = load_image(url)
    assert item.input_path == url and np.array_equal(item.image, _bgr())


def test_http_404(http_root):
    _, base = http_root
    with pytest.raises(InputError, match=r"cannot download http://127\.0\.0\.1:\d+/missing\.png: HTTP 404"):
        load_image(f"{base}/missing.png")


def test_http_connection_refused():
    server = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    with pytest.raises(InputError, match="cannot download"):
        load_image(f"http://127.0.0.1:{port}/x.png")


@pytest.fixture()
def memory_dir():
    base = f"memory://test-{uuid.uuid4().hex}"
    yield base
    fs = fsspec.filesystem("memory")
    if fs.exists(base):
        fs.rm(base, recursive=True)


def test_fsspec_memory_file_and_prefix(memory_dir):
    for name in ["b.png", "sub/a.png", "skip.txt"]:
        with fsspec.open(f"{memory_dir}/{name}", "wb") as f:
            f.write(_png_bytes(_bgr()) if name.endswith(".png") else b"text")
    item = load_image(f"{memory_dir}/b.png")
    assert item.input_path == f"{memory_dir}/b.png" and np.array_equal(item.image, _bgr())
    items = list(iter_input_items(memory_dir))
    prefix = "memory:///" + memory_dir.removeprefix("memory://") + "/"  # fsspec's canonical form
    assert [i.removeprefix(prefix) for i in items] == ["b.png", "sub/a.png"]  # sorted, .txt skipped
    assert len(list(read_inputs(memory_dir))) == 2


def test_fsspec_missing_and_empty_prefix(memory_dir):
    with pytest.raises(InputError, match=r"memory://.*/nope\.png does not exist"):
        load_image(f"{memory_dir}/nope.png")
    with fsspec.open(f"{memory_dir}/d/readme.txt", "wb") as f:
        f.write(b"x")
    with pytest.raises(InputError, match="no image files found in memory://"):
        list(iter_input_items(f"{memory_dir}/d"))


def test_numpy_arrays():
    bgr = _bgr()
    item = load_image(bgr)
    assert item.image is bgr and item.input_path is None and item.page_index is None
    gray = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    for arr in (gray, gray[:, :, None]):
        out = load_image(arr).image
        assert out.shape == (12, 16, 3) and np.array_equal(out[:, :, 1], gray)
    bgra = np.dstack([bgr, np.zeros((12, 16), np.uint8)])
    assert np.array_equal(load_image(bgra).image, bgr)
    assert np.array_equal(load_image(bgr.astype(np.uint16) * 257).image, bgr)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((4, 4, 3), np.float32), "dtype float32"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_bad_arrays(arr, match):
    with pytest.raises(InputError, match=match):
        load_image(arr)


def test_list_of_mixed_kinds_keeps_order(tmp_path):
    path = _write_png(tmp_path / "x.png")
    arr = _bgr()[::-1].copy()
    items = list(read_inputs([str(path), arr, (str(path),)]))
    assert [i.input_path for i in items] == [str(path), None, str(path)]
    assert np.array_equal(items[1].image, arr)


# ----------------------------------------------------------------------------- decoding


def test_exif_orientation_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide x 20 high, left half red
    rgb[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _jpeg_bytes(rgb, exif=exif.tobytes())
    (tmp_path / "rot.jpg").write_bytes(data)
    img = load_image(str(tmp_path / "rot.jpg")).image
    assert img.shape == (40, 20, 3)  # displayed: 20 wide x 40 high, red on top
    assert img[5, 10, 2] > 200 and img[5, 10, 0] < 50  # BGR red
    assert img[35, 10].max() < 50
    with Image.open(io.BytesIO(data)) as im:
        from PIL import ImageOps

        ref = np.asarray(ImageOps.exif_transpose(im))[..., ::-1]
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 8


def test_gray_png_becomes_bgr(tmp_path):
    gray = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    img = load_image(str(_write_png(tmp_path / "g.png", gray))).image
    assert img.shape == (12, 16, 3) and all(np.array_equal(img[:, :, c], gray) for c in range(3))


def test_rgba_png_alpha_dropped(tmp_path):
    bgra = np.dstack([_bgr(), np.full((12, 16), 0, np.uint8)])  # fully transparent
    img = load_image(str(_write_png(tmp_path / "a.png", bgra))).image
    assert np.array_equal(img, _bgr())  # colour kept as stored, not composited


def test_16bit_png_scaled_by_257(tmp_path):
    values = np.array([[0, 128, 257, 385], [386, 32896, 65407, 65535]], dtype=np.uint16)
    img = load_image(str(_write_png(tmp_path / "d.png", values))).image
    assert img.dtype == np.uint8
    assert img[:, :, 0].tolist() == [[0, 0, 1, 1], [2, 128, 255, 255]]


def test_multipage_tiff_pages(tmp_path):
    pages = [np.full((6, 8, 3), 40 * k, np.uint8) for k in range(3)]
    ok, enc = cv2.imencodemulti(".tiff", pages)
    path = tmp_path / "scan.tiff"
    path.write_bytes(enc.tobytes())
    items = list(read_inputs(str(path)))
    assert [(i.input_path, i.page_index) for i in items] == [(str(path), k) for k in range(3)]
    assert [int(i.image[0, 0, 0]) for i in items] == [0, 40, 80]
    assert load_image(str(path)).page_index == 0


def test_decode_image_bytes_core():
    assert np.array_equal(decode_image_bytes(_png_bytes(_bgr()), "x"), _bgr())
    with pytest.raises(InputError, match=r"cannot decode blob\.bin as an image"):
        decode_image_bytes(b"\x00\x01garbage", "blob.bin")


def test_jpeg_with_trailing_bytes_is_fine():
    data = _jpeg_bytes(np.zeros((8, 8, 3), np.uint8)) + b"trailer\xff\xda\x00\x10..."
    assert decode_image_bytes(data, "t.jpg").shape == (8, 8, 3)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match=rf"{missing} does not exist"):
        list(read_inputs(str(missing)))


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.png is empty \(0 bytes\)"):
        load_image(str(tmp_path / "empty.png"))


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "fake.jpg").write_text("hello, not an image")
    with pytest.raises(InputError, match=r"cannot decode .*fake\.jpg as an image"):
        load_image(str(tmp_path / "fake.jpg"))


def test_truncated_jpeg(tmp_path):
    data = _jpeg_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=r"cut\.jpg as an image: truncated JPEG"):
        load_image(str(tmp_path / "cut.jpg"))
    (tmp_path / "cut2.jpg").write_bytes(data[:-2])  # only the EOI marker missing
    with pytest.raises(InputError, match="truncated JPEG"):
        load_image(str(tmp_path / "cut2.jpg"))


def test_truncated_png(tmp_path):
    data = _png_bytes(_bgr())
    (tmp_path / "cut.png").write_bytes(data[:-12])  # IEND chunk gone
    with pytest.raises(InputError, match="truncated PNG"):
        load_image(str(tmp_path / "cut.png"))


def test_pdf_is_reported(tmp_path):
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.7\n...")
    with pytest.raises(InputError, match="PDF input is not supported"):
        load_image(str(tmp_path / "doc.pdf"))


@pytest.mark.parametrize("bad", [42, {"path": "x.png"}, None, b"bytes"])
def test_bad_types(bad):
    with pytest.raises(InputError, match=f"unsupported input .* of type {type(bad).__name__}"):
        list(read_inputs(bad))


def test_bad_type_in_list_is_raised_lazily(tmp_path):
    path = _write_png(tmp_path / "ok.png")
    it = read_inputs([str(path), 3.5])
    assert next(it).input_path == str(path)  # earlier items are already usable
    with pytest.raises(InputError, match="unsupported input 3.5 of type float"):
        next(it)


def test_directory_given_to_load_image(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_image(str(tmp_path))
