"""The tcp backend (default across hosts): prefill pushes raw page bytes to decode's data
endpoint, and decode writes them straight into its KV buffer at its page indices.

Fast path (CPU buffers, whole pages on both sides): a DATA frame is the header followed by
the pages; the sender hands the kernel one list of memoryviews over runs of contiguous
prefill pages (`sendmsg`, no copy in Python), the receiver scatters the bytes into runs of
contiguous decode pages (`recvmsg_into`). Head slices (different tp sizes) and GPU buffers go
through a staging tensor: gather -> send, receive -> scatter.
"""

from __future__ import annotations

import logging
import socket

import numpy as np
import torch

from pdserve.disagg.envs import tcp_piece_bytes
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.decode_service import DataConn, DecodeTransferService
from pdserve.disagg.transfer.decode_side import SocketKVReceiver
from pdserve.disagg.transfer.heads import gather_pages, host_buffer, page_runs, scatter_pages, staging_view
from pdserve.disagg.transfer.prefill_service import Job
from pdserve.disagg.transfer.prefill_side import SocketKVSender
from pdserve.disagg.transfer.socket_manager import SocketKVManager
from pdserve.disagg.transfer.wire import FrameHeader, FrameType, ProtocolError

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 << 20  # pages per DATA frame are capped so one frame stays bounded
STAGING_BYTES = 16 << 20  # per worker / per connection, for head slices and GPU buffers
RECV_LOWAT = 1 << 20  # wake decode's receiving thread per MiB of payload, not per segment


def byte_view(kv: torch.Tensor) -> memoryview | None:
    """The whole CPU buffer as a flat writable byte memoryview (None for device tensors)."""
    if kv.device.type != "cpu":
        return None
    return memoryview(kv.view(-1).view(torch.uint8).numpy())


def new_staging(nbytes: int, kv: torch.Tensor) -> torch.Tensor:
    if kv.device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return host_buffer(nbytes)


class TcpPrefillMover:
    def __init__(self, args: KVArgs) -> None:
        # a transfer is cut into pieces of at least this many bytes, each on its own worker and
        # connection (up to QUEUE_SIZE at once): several TCP streams move more than one here
        self.min_piece_bytes = tcp_piece_bytes()
        self.args = args
        self.kv = args.kv_data
        self.kv_bytes = byte_view(self.kv)
        self.page_nbytes = args.page_nbytes
        self.head_page_nbytes = args.page_nbytes // args.num_kv_heads

    def check_registration(self, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        return None

    def close(self) -> None:
        pass

    def send_piece(self, sock: socket.socket, job: Job, scratch: dict, trailer: bytes = b"") -> int:
        dest = job.dest
        src_pages = job.src_pages
        h0, h1 = dest.src_heads
        slice_nbytes = (h1 - h0) * self.head_page_nbytes
        direct = self.kv_bytes is not None and (h0, h1) == (0, self.args.num_kv_heads)
        cap = MAX_FRAME_BYTES if direct else STAGING_BYTES
        per_frame = max(1, cap // slice_nbytes)
        room, rank = job.sender.room, self.args.engine_rank
        for lo in range(0, len(src_pages), per_frame):
            chunk = src_pages[lo : lo + per_frame]
            header = FrameHeader(
                FrameType.DATA,
                room,
                src_rank=rank,
                offset=job.offset + lo,
                npages=len(chunk),
                head_start=dest.dst_heads[0],
                head_end=dest.dst_heads[1],
                payload_len=len(chunk) * slice_nbytes,
            )
            if direct:
                pn, mv = self.page_nbytes, self.kv_bytes
                assert mv is not None
                views = [mv[s * pn : (s + n) * pn] for s, n in page_runs(chunk)]
            else:
                staging = scratch.get("staging")
                if staging is None or staging.numel() < len(chunk) * slice_nbytes:
                    staging = scratch["staging"] = new_staging(max(STAGING_BYTES, slice_nbytes), self.kv)
                out = staging_view(staging, self.kv, len(chunk), (h0, h1))
                gather_pages(self.kv, chunk, (h0, h1), out)
                views = [memoryview(staging[: header.payload_len].numpy())]
            last = lo + per_frame >= len(src_pages) and not job.sender.done  # no META once failed
            wire.send_views(sock, [header.pack(), *views, trailer if last else b""])
        return len(src_pages) * slice_nbytes


class TcpDecodeMover:
    def __init__(self, args: KVArgs, svc_getter) -> None:
        self.args = args
        self.kv = args.kv_data
        self.kv_bytes = byte_view(self.kv)
        self.page_nbytes = args.page_nbytes
        self.head_page_nbytes = args.page_nbytes // args.num_kv_heads
        self._svc_getter = svc_getter

    def register_extra(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def on_disconnect(self, conn: DataConn) -> None:
        pass

    def handle_frame(self, conn: DataConn, h: FrameHeader) -> None:
        if h.type != FrameType.DATA:
            raise ProtocolError(f"{h.type.name} frames belong to the shm backend")
        svc: DecodeTransferService = self._svc_getter()
        svc.check_geometry(h)
        slice_nbytes = (h.head_end - h.head_start) * self.head_page_nbytes
        if h.payload_len != h.npages * slice_nbytes:
            raise ProtocolError(f"DATA payload {h.payload_len} bytes != {h.npages} pages x {slice_nbytes}")
        r = svc.lookup(h.room)
        pages = r.begin_write(h) if r is not None else None  # ProtocolError -> connection closed
        if pages is None:
            logger.warning("discarding %d bytes of KV for unknown or finished room %d", h.payload_len, h.room)
            wire.drain(conn.sock, h.payload_len)
            return
        assert r is not None
        complete = False
        try:
            self._receive(conn, h, pages, slice_nbytes)
            complete = True
        finally:
            r.end_write(h.payload_len, complete)

    def _receive(self, conn: DataConn, h: FrameHeader, pages: np.ndarray, slice_nbytes: int) -> None:
        heads = (h.head_start, h.head_end)
        if self.kv_bytes is not None and heads == (0, self.args.num_kv_heads):
            pn, mv = self.page_nbytes, self.kv_bytes
            wire.recv_into_views(conn.sock, [mv[s * pn : (s + n) * pn] for s, n in page_runs(pages)], RECV_LOWAT)
            return
        staging = conn.scratch.get("staging")
        if staging is None:
            staging = conn.scratch["staging"] = new_staging(max(STAGING_BYTES, slice_nbytes), self.kv)
        per = max(1, staging.numel() // slice_nbytes)
        for lo in range(0, len(pages), per):
            sub = pages[lo : lo + per]
            nbytes = len(sub) * slice_nbytes
            wire.recv_exact_into(conn.sock, memoryview(staging[:nbytes].numpy()))
            scatter_pages(self.kv, sub, heads, staging_view(staging, self.kv, len(sub), heads))


class TcpKVManager(SocketKVManager):
    backend = "tcp"

    def _make_prefill_mover(self) -> TcpPrefillMover:
        return TcpPrefillMover(self.args)

    def _make_decode_mover(self) -> TcpDecodeMover:
        return TcpDecodeMover(self.args, lambda: self.decode)


class TcpKVSender(SocketKVSender):
    pass


class TcpKVReceiver(SocketKVReceiver):
    pass
