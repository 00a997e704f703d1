"""A stored page: a fixed header (magic, version, key, byte count, CRC-32 of the bytes) and
the page's raw bytes. A reader checks all of them: a corrupt, truncated or foreign record is
rejected, never loaded into a KV pool."""

from __future__ import annotations

import struct
import zlib

MAGIC = b"PDKV"
VERSION = 1
_HEADER = struct.Struct("<4sH32sQI")  # magic, version, key (sha256), nbytes, crc32
HEADER_SIZE = _HEADER.size


class RecordError(ValueError):
    """A record that must not be used (corrupt, truncated, for another key or layout)."""


def encode(key: str, page: bytes | memoryview) -> bytes:
    data = bytes(page)
    return _HEADER.pack(MAGIC, VERSION, bytes.fromhex(key), len(data), zlib.crc32(data)) + data


def check(key: str, record: bytes | memoryview) -> None:
    """What a store can check without knowing the layout: header, key, length, checksum."""
    mv = memoryview(record)
    if len(mv) < HEADER_SIZE:
        raise RecordError(f"record of {len(mv)} bytes is shorter than its header")
    _, _, _, nbytes, _ = _HEADER.unpack_from(mv)
    decode(key, mv, nbytes)


def decode(key: str, record: bytes | memoryview, page_nbytes: int) -> memoryview:
    """The page bytes of `record`, checked against `key` and the expected size."""
    mv = memoryview(record)
    if len(mv) < HEADER_SIZE:
        raise RecordError(f"record of {len(mv)} bytes is shorter than its header")
    magic, version, k, nbytes, crc = _HEADER.unpack_from(mv)
    if magic != MAGIC or version != VERSION:
        raise RecordError(f"not a pdserve KV record (magic {magic!r}, version {version})")
    if k.hex() != key:
        raise RecordError("record holds another key")
    if nbytes != page_nbytes or len(mv) != HEADER_SIZE + nbytes:
        raise RecordError(
            f"record holds {nbytes} bytes ({len(mv) - HEADER_SIZE} present), the layout needs {page_nbytes}"
        )
    data = mv[HEADER_SIZE:]
    if zlib.crc32(data) != crc:
        raise RecordError("record checksum mismatch")
    return data
