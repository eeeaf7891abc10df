"""Scalars in TensorBoard's event-file format, written and read without TensorFlow or protobuf.

An event file is a sequence of records, each framed as::

    uint64 length (little endian) | uint32 masked CRC-32C of those 8 bytes | payload | uint32 masked CRC-32C of payload

and each payload is a serialized ``tensorflow.Event`` message: ``wall_time`` (field 1, double),
``step`` (2, int64), and either ``file_version`` (3, the file's first record, ``"brain.Event:2"``)
or ``summary`` (5), whose repeated ``value`` (1) holds a ``tag`` (1) and a ``simple_value`` (2,
float). That small subset is all scalars need, so it is encoded here by hand; TensorBoard, and
tools built on its reader, show the scalars as usual.

The file name must contain ``tfevents`` for TensorBoard to load it. :func:`read_scalars` reads back
what :class:`EventFileWriter` writes (and skips any other kind of event) so a resumed run can keep
the history it continues.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

FILE_VERSION = "brain.Event:2"
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; pure Python, fine for the few KB an epoch writes."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The record format's checksum: the CRC rotated right by 15 bits plus a constant, so a CRC
    stored inside checksummed data does not checksum to something predictable."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One record: length, its masked CRC, the payload, its masked CRC."""
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


def iter_records(f: BinaryIO) -> Iterator[bytes]:
    """The payloads of the records in ``f``. A truncated last record (a writer killed mid-write)
    ends the iteration; a checksum mismatch raises ``ValueError``."""
    while True:
        header = f.read(12)
        if len(header) < 12:
            return
        (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
        if masked_crc32c(header[:8]) != length_crc:
            raise ValueError("event file: corrupt record length")
        body = f.read(length + 4)
        if len(body) < length + 4:
            return
        payload, (crc,) = body[:length], struct.unpack("<I", body[length:])
        if masked_crc32c(payload) != crc:
            raise ValueError("event file: corrupt record payload")
        yield payload


# ------------------------------------------------------------------------------------ protobuf wire format

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """A serialized ``Event``: the file-version header, or a summary of ``tag -> value`` scalars."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _length_delimited(3, file_version.encode("utf-8"))
    if scalars:
        values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode("utf-8"))
                                            + _key(2, 5) + struct.pack("<f", float(v)))
                          for tag, v in scalars.items())
        out += _length_delimited(5, values)
    return out


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field, wire_type, value)`` of a message: ints for varint/fixed, bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 1:
            value, i = int.from_bytes(data[i:i + 8], "little"), i + 8
        elif wire == 5:
            value, i = int.from_bytes(data[i:i + 4], "little"), i + 4
        elif wire == 2:
            n, i = _read_varint(data, i)
            value, i = data[i:i + n], i + n
        else:
            raise ValueError(f"event file: unsupported wire type {wire}")
        yield field, wire, value


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


@dataclass(frozen=True)
class Scalar:
    """One scalar of an event file."""

    tag: str
    step: int
    value: float
    wall_time: float


def decode_scalars(payload: bytes) -> list[Scalar]:
    """The ``simple_value`` scalars of one serialized ``Event`` (none for other events)."""
    wall_time, step, summary = 0.0, 0, b""
    for field, _, value in _fields(payload):
        if field == 1:
            wall_time = struct.unpack("<d", int(value).to_bytes(8, "little"))[0]  # type: ignore[arg-type]
        elif field == 2:
            step = int(value) - (1 << 64) if int(value) >= 1 << 63 else int(value)  # type: ignore[arg-type]
        elif field == 5:
            summary = bytes(value)  # type: ignore[arg-type]
    out = []
    for field, _, value in _fields(summary):
        if field != 1:
            continue
        tag, simple = None, None
        for f, _, v in _fields(bytes(value)):  # type: ignore[arg-type]
            if f == 1:
                tag = bytes(v).decode("utf-8")  # type: ignore[arg-type]
            elif f == 2:
                simple = struct.unpack("<f", int(v).to_bytes(4, "little"))[0]  # type: ignore[arg-type]
        if tag is not None and simple is not None:
            out.append(Scalar(tag, step, simple, wall_time))
    return out


def read_scalars(path: str | os.PathLike) -> list[Scalar]:
    """Every scalar of the event file at ``path``, in file order."""
    with open(path, "rb") as f:
        return [s for payload in iter_records(f) for s in decode_scalars(payload)]


# ------------------------------------------------------------------------------------ the writer

class EventFileWriter:
    """Appends scalar events to one event file (created with its file-version record if new).

    Each :meth:`add_scalars` call is one record, written and flushed at once: a training process
    killed later loses nothing already logged, and a reader sees it while training goes on.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "ab")
        if new:
            self._write(encode_event(time.time(), 0, file_version=FILE_VERSION))

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        """Log ``tag -> value`` at ``step`` (one event; TensorBoard draws one curve per tag)."""
        if scalars:
            self._write(encode_event(time.time() if wall_time is None else wall_time, step, scalars=scalars))

    def _write(self, payload: bytes) -> None:
        self._f.write(frame_record(payload))
        self._f.flush()

    def close(self) -> None:
        """Close the file (further writes raise)."""
        self._f.close()

    def __enter__(self) -> "EventFileWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
