"""The shm backend (prefill and decode on one host): decode's KV pool itself lives in a named
shared-memory segment; prefill maps it once (name and size come with decode's registration)
and copies pages straight into it: one copy, no socket for the bytes.

Control still goes over decode's data endpoint, so decode keeps ownership of its pages:

    prefill                                   decode
    WRITE_BEGIN(room, offset, npages, heads) ->   checks the receiver still wants them,
                                             <-   ACK ok (a write slot is held)
    copy pages into the mapped segment
    WRITE_DONE(same fields)                  ->   releases the slot, counts the bytes
    META(record)                             ->   Success once all bytes + metadata are in

A receiver that fails or is aborted refuses new WRITE_BEGINs and reports Failed only after
the granted write finished (or its connection dropped), so freed pages are never written.
"""

from __future__ import annotations

import logging
import socket

import numpy as np

from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import DTYPE_NAMES, KVArgs
from pdserve.disagg.transfer.decode_service import DataConn, DecodeTransferService
from pdserve.disagg.transfer.decode_side import SocketKVReceiver
from pdserve.disagg.transfer.heads import copy_pages, head_range
from pdserve.disagg.transfer.prefill_service import Job
from pdserve.disagg.transfer.prefill_side import SocketKVSender
from pdserve.disagg.transfer.shm_segment import (SegmentMaps, allocate_kv_buffer, check_shm_name,
                                                 cleanup_stale_segments, free_kv_buffer, new_shm_name, segment_of)
from pdserve.disagg.transfer.socket_manager import SocketKVManager
from pdserve.disagg.transfer.wire import FrameHeader, FrameType, ProtocolError

__all__ = ["ShmKVManager", "ShmKVSender", "ShmKVReceiver", "allocate_kv_buffer", "free_kv_buffer",
           "new_shm_name", "cleanup_stale_segments"]

logger = logging.getLogger(__name__)
_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class ShmPrefillMover:
    max_pieces = 1  # one copy per request: torch parallelises it internally

    def __init__(self, args: KVArgs) -> None:
        self.args = args
        self.maps = SegmentMaps()

    def _decode_shape(self, body: wire.RegisterBody) -> tuple[int, ...]:
        h0, h1 = head_range(body.decode_rank, body.decode_tp_size, body.total_kv_heads)
        heads = h1 - h0
        return (body.decode_num_pages, body.num_layers, 2, body.page_size, heads, body.head_dim)

    def check_registration(self, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        if body.shm_name is None:
            return "the shm backend needs decode's segment name"
        try:
            self.maps.get(body.shm_name, self._decode_shape(body), _DTYPES[body.dtype])
        except (ValueError, OSError) as e:
            return f"cannot map decode's KV segment: {e}"
        return None

    def send_piece(self, sock: socket.socket, job: Job, scratch: dict) -> int:
        dest, a = job.dest, self.args
        assert dest.shm_name is not None
        h0, h1 = head_range(dest.decode_rank, dest.decode_tp_size, a.layout.total_kv_heads)
        heads = h1 - h0
        shape = (dest.decode_num_pages, a.num_layers, 2, a.page_size, heads, a.head_dim)
        dst = self.maps.get(dest.shm_name, shape, a.kv_data.dtype)
        n = len(job.src_pages)
        h = FrameHeader(FrameType.WRITE_BEGIN, job.sender.room, src_rank=a.engine_rank, offset=job.offset,
                        npages=n, head_start=dest.dst_heads[0], head_end=dest.dst_heads[1])
        wire.send_frame(sock, h)
        ack = wire.read_ack(sock, job.sender.room)
        if not ack.ok:
            raise RuntimeError(f"decode refused the write: {ack.error}")
        copy_pages(a.kv_data, job.src_pages, dest.src_heads, dst, dest.pages[job.offset:job.offset + n],
                   dest.dst_heads)
        h.type = FrameType.WRITE_DONE
        wire.send_frame(sock, h)
        return n * (dest.src_heads[1] - dest.src_heads[0]) * (a.page_nbytes // a.num_kv_heads)


class ShmDecodeMover:
    def __init__(self, args: KVArgs, svc_getter) -> None:
        self.args = args
        self.head_page_nbytes = args.page_nbytes // args.num_kv_heads
        self._svc_getter = svc_getter

    def register_extra(self) -> dict:
        return {"shm_name": self.args.shm_name}

    def _reply(self, conn: DataConn, room: int, error: str | None) -> None:
        body = wire.encode_body(wire.AckBody(ok=error is None, error=error or ""))
        wire.send_frame(conn.sock, FrameHeader(FrameType.ACK, room, src_rank=self.args.engine_rank), body)

    def handle_frame(self, conn: DataConn, h: FrameHeader) -> None:
        svc: DecodeTransferService = self._svc_getter()
        if h.type == FrameType.DATA:
            raise ProtocolError("DATA frames belong to the tcp backend")
        svc.check_geometry(h)
        if h.payload_len:
            raise ProtocolError(f"{h.type.name} carries no payload")
        key = (h.room, h.src_rank, h.offset, h.npages, h.head_start, h.head_end)
        if h.type == FrameType.WRITE_BEGIN:
            if conn.grant is not None:
                raise ProtocolError("WRITE_BEGIN while a granted write is still open")
            r = svc.lookup(h.room)
            pages = r.begin_write(h) if r is not None else None  # ProtocolError -> connection closed
            if pages is None:
                self._reply(conn, h.room, f"room {h.room} is unknown or no longer accepts KV")
                return
            conn.grant = (r, key)
            self._reply(conn, h.room, None)
        else:  # WRITE_DONE
            if conn.grant is None or conn.grant[1] != key:
                raise ProtocolError("WRITE_DONE without a matching WRITE_BEGIN")
            r, _ = conn.grant
            conn.grant = None
            r.end_write(h.npages * (h.head_end - h.head_start) * self.head_page_nbytes, True)

    def on_disconnect(self, conn: DataConn) -> None:
        if conn.grant is not None:
            r, _ = conn.grant
            conn.grant = None
            logger.warning("prefill disconnected during a granted write to room %d", r.room)
            r.end_write(0, False)  # pages may be half written: the bytes do not count


class ShmKVManager(SocketKVManager):
    """Decode mode needs `args.kv_data` from `allocate_kv_buffer(..., shm_name=args.shm_name)`."""

    backend = "shm"

    def __init__(self, args: KVArgs, mode: DisaggregationMode, **kw) -> None:
        if mode == DisaggregationMode.DECODE:
            if not args.shm_name:
                raise ValueError("decode with the shm backend needs KVArgs.shm_name (the KV pool's segment)")
            check_shm_name(args.shm_name)
            if segment_of(args.kv_data) != args.shm_name:
                raise ValueError(f"kv_data is not the shared-memory segment {args.shm_name}: allocate it with "
                                 "allocate_kv_buffer(shape, dtype, shm_name)")
        super().__init__(args, mode, **kw)

    def _make_prefill_mover(self) -> ShmPrefillMover:
        return ShmPrefillMover(self.args)

    def _make_decode_mover(self) -> ShmDecodeMover:
        return ShmDecodeMover(self.args, lambda: self.decode)

    def shutdown(self) -> None:
        super().shutdown()
        if self.prefill is not None:
            self.prefill.mover.maps.clear()  # type: ignore[attr-defined]


class ShmKVSender(SocketKVSender):
    pass


class ShmKVReceiver(SocketKVReceiver):
    pass
