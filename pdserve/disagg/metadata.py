"""The fixed-size metadata record prefill sends after a request's KV pages.

Byte layout (little-endian, 32 bytes, `struct` format ``<QqdII``):

    offset  size  field
    0       8     room              u64  bootstrap_room of the request (collision check)
    8       8     output_token_id   i64  first token sampled by prefill
    16      8     output_logprob    f64  its logprob (NaN when not computed)
    24      4     cached_tokens     u32  prompt tokens prefill found in its prefix cache
    28      4     prompt_tokens     u32  prompt length the KV pages cover
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_RECORD = struct.Struct("<QqdII")
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


class MetadataError(ValueError):
    """A metadata record that is malformed or belongs to another room."""


@dataclass(frozen=True, slots=True)
class KVMetadata:
    room: int
    output_token_id: int
    output_logprob: float = math.nan
    cached_tokens: int = 0
    prompt_tokens: int = 0

    SIZE = _RECORD.size  # 32

    def __post_init__(self) -> None:
        if not (0 <= self.room <= U64_MAX):
            raise MetadataError(f"room {self.room} is not a u64")
        if not (-(1 << 63) <= self.output_token_id < (1 << 63)):
            raise MetadataError(f"output_token_id {self.output_token_id} does not fit in i64")
        for name in ("cached_tokens", "prompt_tokens"):
            v = getattr(self, name)
            if not (0 <= v <= U32_MAX):
                raise MetadataError(f"{name} {v} is not a u32")

    def pack(self) -> bytes:
        return _RECORD.pack(
            self.room, self.output_token_id, float(self.output_logprob), self.cached_tokens, self.prompt_tokens
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, expected_room: int | None = None) -> "KVMetadata":
        """Decode one record; with `expected_room`, a record for another room raises MetadataError."""
        if len(data) != _RECORD.size:
            raise MetadataError(f"metadata record must be {_RECORD.size} bytes, got {len(data)}")
        room, tok, lp, cached, prompt = _RECORD.unpack(data)
        if expected_room is not None and room != expected_room:
            logger.error("KV metadata room mismatch: expected %d, got %d", expected_room, room)
            raise MetadataError(f"metadata is for room {room}, expected room {expected_room}")
        return cls(room, tok, lp, cached, prompt)
