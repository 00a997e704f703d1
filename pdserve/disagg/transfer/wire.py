"""Wire format of the tcp/shm backends: a fixed `struct` header, an optional msgpack body,
then raw bytes. No pickle. Every length is checked before anything is read or allocated.

Header, 40 bytes, little-endian, `struct` format ``<4sBBHQIIHHIQ``:

    offset size field        meaning
    0      4    magic        b"PDKV"
    4      1    version      1
    5      1    type         FrameType
    6      2    src_rank     sender's tp rank
    8      8    room         bootstrap_room (u64)
    16     4    offset       first page, as a position in the request's page list
    20     4    npages       pages covered by the frame
    24     2    head_start   first KV head (receiver-local) the payload carries
    26     2    head_end     one past the last head
    28     4    body_len     bytes of msgpack body that follow (<= MAX_BODY)
    32     8    payload_len  raw bytes after the body (checked per type)
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Callable

import msgspec

MAGIC = b"PDKV"
VERSION = 1
HEADER = struct.Struct("<4sBBHQIIHHIQ")
HEADER_SIZE = HEADER.size  # 40
MAX_BODY = 64 * 1024
MAX_PAGES_PER_ROOM = 1 << 22  # far above any real request; bounds the page-list payload
IOV_PER_CALL = 64  # buffers per sendmsg/recvmsg_into call: more than a socket buffer holds
_DRAIN_CHUNK = 1 << 20


class FrameType(IntEnum):
    REGISTER = 1  # decode -> prefill control: body RegisterBody, payload npages x u32 decode page ids
    DATA = 2  # prefill -> decode (tcp): payload = npages pages (heads [head_start, head_end))
    META = 3  # prefill -> decode: payload = one KVMetadata record (32 bytes)
    # decode -> prefill control: decode gave up on `room`; prefill -> decode data: prefill gave
    # up, and (standing grants) none of its writes into the room's pages is under way or will start
    ABORT = 4
    ACK = 5  # reply to REGISTER / WRITE_BEGIN: body AckBody
    WRITE_BEGIN = 6  # prefill -> decode (shm): may I write these pages now?
    WRITE_DONE = 7  # prefill -> decode (shm): the granted pages are written
    GROUP_JOIN = 8  # prefill -> decode (gloo): build the 2-rank process group of this connection (room = group id)
    # prefill -> decode (shm, nixl, mooncake): writing these pages now under the standing grant
    # decode gave with its REGISTER (RegisterBody.granted); no reply, WRITE_DONE follows
    WRITE_GRANTED = 9


class ProtocolError(Exception):
    """A frame that violates the format or a limit; the connection is closed."""


@dataclass(slots=True)
class FrameHeader:
    type: FrameType
    room: int
    src_rank: int = 0
    offset: int = 0
    npages: int = 0
    head_start: int = 0
    head_end: int = 0
    body_len: int = 0
    payload_len: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            VERSION,
            int(self.type),
            self.src_rank,
            self.room,
            self.offset,
            self.npages,
            self.head_start,
            self.head_end,
            self.body_len,
            self.payload_len,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "FrameHeader":
        magic, version, ftype, src, room, off, npages, h0, h1, blen, plen = HEADER.unpack(data)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}")
        if version != VERSION:
            raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
        try:
            ftype = FrameType(ftype)
        except ValueError:
            raise ProtocolError(f"unknown frame type {ftype}") from None
        if blen > MAX_BODY:
            raise ProtocolError(f"body of {blen} bytes exceeds the {MAX_BODY}-byte limit")
        if h0 > h1:
            raise ProtocolError(f"head range [{h0}, {h1}) is reversed")
        return cls(ftype, room, src, off, npages, h0, h1, blen, plen)


# -- msgpack bodies (decoded with a schema: wrong types or sizes are rejected) ------------
Rank = Annotated[int, msgspec.Meta(ge=0, le=4095)]
Count = Annotated[int, msgspec.Meta(ge=1, le=1 << 31)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
ShortStr = Annotated[str, msgspec.Meta(max_length=255)]


class RegisterBody(msgspec.Struct, forbid_unknown_fields=True):
    decode_rank: Rank
    decode_tp_size: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    host: ShortStr  # decode rank's data endpoint
    port: Port
    backend: ShortStr
    page_size: Count
    num_layers: Count
    total_kv_heads: Count
    head_dim: Count
    dtype: ShortStr
    decode_num_pages: Count  # size of decode's pool: every page id must be below it
    shm_name: ShortStr | None = None
    # nixl: decode's agent metadata; mooncake: its session "host:rpc_port" (as bytes)
    engine_meta: Annotated[bytes, msgspec.Meta(max_length=1 << 20)] | None = None
    kv_ptr: Annotated[int, msgspec.Meta(ge=0)] | None = None  # decode's pool address (uint64)
    # one-sided backends: decode grants the write of all these pages now (a standing grant),
    # so prefill writes without a WRITE_BEGIN -> ACK round trip and sends ABORT to release it
    granted: bool = False


class AckBody(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    error: Annotated[str, msgspec.Meta(max_length=4096)] = ""


_enc = msgspec.msgpack.Encoder()
_register_dec = msgspec.msgpack.Decoder(RegisterBody)
_ack_dec = msgspec.msgpack.Decoder(AckBody)


def encode_body(body: msgspec.Struct) -> bytes:
    return _enc.encode(body)


def decode_register(data: bytes) -> RegisterBody:
    try:
        return _register_dec.decode(data)
    except msgspec.DecodeError as e:  # ValidationError is a subclass
        raise ProtocolError(f"bad REGISTER body: {e}") from None


def decode_ack(data: bytes) -> AckBody:
    try:
        return _ack_dec.decode(data)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"bad ACK body: {e}") from None


# -- socket helpers ---------------------------------------------------------------------
def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """n bytes (caller bounds n before calling)."""
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return buf


def recv_exact_into(sock: socket.socket, mv: memoryview) -> None:
    got, n = 0, len(mv)
    while got < n:
        k = sock.recv_into(mv[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection mid-frame")
        got += k


def read_abort_reason(sock: socket.socket, h: FrameHeader) -> str | None:
    """The error text of an ABORT frame whose header was just read (None: none given)."""
    if h.payload_len:
        raise ProtocolError("ABORT carries no payload")
    return decode_ack(bytes(recv_exact(sock, h.body_len))).error


def read_header(sock: socket.socket, keep_waiting: Callable[[], bool] | None = None) -> FrameHeader | None:
    """The next header; None on a clean close between frames.

    With `keep_waiting`, a socket timeout before the first header byte (an idle persistent
    connection) asks it whether to go on waiting (True) or return None.
    """
    buf = bytearray(HEADER_SIZE)
    mv = memoryview(buf)
    got = 0
    while got < HEADER_SIZE:
        try:
            k = sock.recv_into(mv[got:], HEADER_SIZE - got)
        except socket.timeout:
            if got == 0 and keep_waiting is not None:
                if keep_waiting():
                    continue
                return None
            raise
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError("peer closed the connection inside a frame header")
        got += k
    return FrameHeader.unpack(buf)


def recv_into_views(sock: socket.socket, views: list[memoryview], lowat: int = 0) -> None:
    """Fill every buffer in order (scatter receive, IOV_PER_CALL buffers per system call).

    With `lowat`, while at least 2 x lowat bytes are still to come, they are read with
    SO_RCVLOWAT = lowat: the kernel wakes this thread once that much has arrived, not at
    every segment, so a big payload takes a few hundred wake-ups and system calls instead of
    thousands (measured on loopback, 4 streams, 256 MB: 3.7 against 2.9 GB/s). The last
    2 x lowat bytes (all of a small payload) are read as they arrive, so this thread copies
    them out while the sender still copies the rest in: waiting for the whole of a 1 MB
    payload first put the two copies one after the other (session 7: 1 MB 1.06 -> 0.63 ms).
    The socket's timeout still bounds every wait; the mark is back at 1 byte afterwards."""
    views = [v for v in views if len(v)]
    left = sum(len(v) for v in views)
    mark = 1
    i = 0
    try:
        while i < len(views):
            want = lowat if lowat and left >= 2 * lowat else 1
            if want != mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                mark = want
            k = sock.recvmsg_into(views[i : i + IOV_PER_CALL])[0]
            if k == 0:
                raise ConnectionError("peer closed the connection mid-frame")
            left -= k
            i = _advance(views, i, k)
    finally:
        if mark != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass  # the connection is gone anyway


def _advance(views: list[memoryview], i: int, k: int) -> int:
    """Index of the first buffer not yet done after k more bytes moved from views[i] on;
    a partly done buffer is trimmed in place."""
    while k:
        v = views[i]
        if k >= len(v):
            k -= len(v)
            i += 1
        else:
            views[i] = v[k:]
            k = 0
    return i


def send_views(sock: socket.socket, views: list[bytes | memoryview]) -> None:
    """Send every buffer in order (gather send, IOV_PER_CALL buffers per system call)."""
    views = [memoryview(v) for v in views if len(v)]
    i = 0
    while i < len(views):
        i = _advance(views, i, sock.sendmsg(views[i : i + IOV_PER_CALL]))


def drain(sock: socket.socket, n: int) -> None:
    """Read and discard n bytes (a well-formed frame nobody wants)."""
    scratch = memoryview(bytearray(min(n, _DRAIN_CHUNK) or 1))
    while n > 0:
        k = sock.recv_into(scratch, min(n, len(scratch)))
        if k == 0:
            raise ConnectionError("peer closed the connection mid-frame")
        n -= k


def send_frame(
    sock: socket.socket, header: FrameHeader, body: bytes = b"", payload: list[bytes | memoryview] | None = None
) -> None:
    header.body_len = len(body)
    if payload is not None:
        header.payload_len = sum(len(p) for p in payload)
    send_views(sock, [header.pack(), body, *(payload or [])])


def read_ack(sock: socket.socket, room: int) -> AckBody:
    h = read_header(sock)
    if h is None:
        raise ConnectionError("peer closed the connection before acknowledging")
    if h.type != FrameType.ACK or h.room != room or h.payload_len:
        raise ProtocolError(f"expected ACK for room {room}, got {h.type.name} for room {h.room}")
    return decode_ack(bytes(recv_exact(sock, h.body_len)))


def tune_socket(sock: socket.socket, sndbuf: int = 4 << 20) -> None:
    """A large send buffer (fewer wake-ups on big transfers), no Nagle delay on small frames.
    The receive buffer is left to the kernel's autotuning, which grows it further than a
    fixed SO_RCVBUF may (tcp_rmem max) and measured no worse on loopback."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    except OSError:
        pass
