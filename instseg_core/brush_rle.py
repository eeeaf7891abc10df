"""Label Studio's brush RLE: the byte stream a ``brushlabels`` region stores in ``value.rle``.

It is not COCO RLE. Label Studio's editor paints brush regions on an RGBA canvas and stores the
canvas's bytes (``height * width * 4`` values, row-major, R, G, B, A per pixel) packed with the
``rle-pack`` bit stream of thi.ng/umbrella; its Python SDK decodes it the same way
(``label_studio_sdk.converter.brush``) and reads the mask from the alpha channel (nonzero =
inside). The stream, most significant bit first:

* header: value count (32 bits), word size - 1 (5 bits), four run-length field sizes - 1 (4 bits
  each);
* then records until the count is reached: a repeat flag (1 bit), which of the four field sizes
  the length uses (2 bits), length - 1 (that many bits), then one word (repeat: the value of the
  whole run) or ``length`` words (literal values);
* zero bits up to the next byte; the list of byte values is what goes into the JSON.

:func:`encode` writes a mask as repeat records only (every run of pixels is a run of 4x as many
equal bytes: 255 inside, 0 outside, as the SDK's own ``mask2rle``/``image2rle`` do).
:func:`decode` reads any stream (literal records too, as the editor writes them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["MAX_PIXELS", "decode", "decode_values", "encode", "encode_coco"]

_WORD_BITS = 8
# Length-field sizes of the four record classes. Runs are multiples of 4 bytes (one RGBA pixel), so
# 5 bits covers runs up to 8 pixels, 8 up to 64, 12 up to 1024, 16 up to 16384 (longer runs are
# split into several records).
_RLE_SIZES = (5, 8, 12, 16)
_MAX_RUN = 1 << _RLE_SIZES[-1]
_INSIDE = 255
#: The count field has 32 bits and holds 4 values per pixel: larger images cannot be encoded.
MAX_PIXELS = (1 << 32) // 4 - 1
_CHUNK_RECORDS = 1 << 16  # records expanded to bits at a time (bounds the temporaries)


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The bits (uint8 0/1, MSB first) of ``values[i]`` written in ``widths[i]`` bits each, concatenated."""
    total = int(widths.sum())
    field = np.repeat(np.arange(len(values)), widths)
    ends = np.cumsum(widths)
    shift = np.repeat(ends, widths) - 1 - np.arange(total)  # bit position within the field, from the right
    return ((values[field] >> shift.astype(np.uint64)) & np.uint64(1)).astype(np.uint8)


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and values (bool) of a 1-D bool array."""
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    return lengths, flat[starts]


def encode(mask: np.ndarray) -> list[int]:
    """The brush RLE of one ``[H, W]`` mask (nonzero = inside) as Label Studio stores it: a list of
    byte values. Inside pixels become RGBA (255, 255, 255, 255), outside ones (0, 0, 0, 0)."""
    if mask.ndim != 2:
        raise ValueError(f"expected one [H, W] mask, got shape {mask.shape}")
    if mask.size > MAX_PIXELS:
        raise ValueError(f"a {mask.shape[1]}x{mask.shape[0]} mask is too large for Label Studio's brush RLE "
                         f"(at most {MAX_PIXELS} pixels)")
    header_values = [mask.size * 4, _WORD_BITS - 1] + [s - 1 for s in _RLE_SIZES]
    header_widths = [32, 5, 4, 4, 4, 4]
    pieces = [_bits(np.asarray(header_values, np.uint64), np.asarray(header_widths, np.int64))]
    if mask.size:
        lengths, inside = _runs(np.ascontiguousarray(mask).reshape(-1) != 0)
        lengths = lengths.astype(np.int64) * 4  # bytes, not pixels
        # runs longer than the largest length field become several records
        n_records = -(-lengths // _MAX_RUN)
        record_run = np.repeat(np.arange(len(lengths)), n_records)
        first = np.concatenate(([0], np.cumsum(n_records)[:-1]))
        record_len = np.full(len(record_run), _MAX_RUN, np.int64)
        last = first + n_records - 1
        record_len[last] = lengths - _MAX_RUN * (n_records - 1)
        record_value = np.where(inside[record_run], _INSIDE, 0).astype(np.uint64)
        size_class = np.searchsorted(np.asarray([1 << s for s in _RLE_SIZES]), record_len - 1, side="right")
        size_bits = np.asarray(_RLE_SIZES, np.int64)[size_class]
        for k in range(0, len(record_len), _CHUNK_RECORDS):
            sl = slice(k, k + _CHUNK_RECORDS)
            n = len(record_len[sl])
            # each record: repeat flag 1, size class, length - 1, the value
            values = np.stack([np.ones(n, np.uint64), size_class[sl].astype(np.uint64),
                               (record_len[sl] - 1).astype(np.uint64), record_value[sl]], axis=1).reshape(-1)
            widths = np.stack([np.ones(n, np.int64), np.full(n, 2, np.int64), size_bits[sl],
                               np.full(n, _WORD_BITS, np.int64)], axis=1).reshape(-1)
            pieces.append(_bits(values, widths))
    return np.packbits(np.concatenate(pieces)).tolist()  # packbits pads the last byte with zeros


def encode_coco(rle: dict) -> list[int]:
    """The brush RLE of a COCO RLE mask (``{"size": [h, w], "counts": ...}``, compressed or not)."""
    from instseg_core.masks import decode_rle

    return encode(decode_rle([rle])[0])


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(data, np.uint8))
        self.pos = 0

    def read(self, width: int) -> int:
        if self.pos + width > len(self.bits):
            raise ValueError("brush RLE ends before its declared value count")
        value = 0
        for bit in self.bits[self.pos:self.pos + width].tolist():
            value = (value << 1) | bit
        self.pos += width
        return value


def decode_values(rle: Sequence[int] | bytes) -> np.ndarray:
    """All values of a brush RLE stream (``H * W * 4`` for an image), as uint32 (word sizes up to 32)."""
    data = bytes(rle)
    reader = _BitReader(data)
    count = reader.read(32)
    word = reader.read(5) + 1
    sizes = [reader.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, np.uint32)
    i = 0
    while i < count:
        repeat = reader.read(1)
        n = reader.read(sizes[reader.read(2)]) + 1
        if i + n > count:
            raise ValueError(f"brush RLE run of {n} values overflows its declared count {count}")
        if repeat:
            out[i:i + n] = reader.read(word)
        else:
            out[i:i + n] = [reader.read(word) for _ in range(n)]
        i += n
    return out


def decode(rle: Sequence[int] | bytes, height: int, width: int) -> np.ndarray:
    """The ``[height, width]`` bool mask of a brush RLE (alpha channel nonzero = inside)."""
    values = decode_values(rle)
    if values.size != height * width * 4:
        raise ValueError(f"brush RLE holds {values.size} values, not {height}x{width}x4")
    return values.reshape(height, width, 4)[:, :, 3] != 0
