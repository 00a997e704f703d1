"""Backends where prefill writes pages straight into decode's KV pool (shm, nixl,
mooncake): the control protocol they share, and the byte ranges a write covers.

Control goes over decode's data endpoint, so decode keeps ownership of its pages. Decode
grants the write of all of a request's pages with its REGISTER (a standing grant,
RegisterBody.granted), so prefill writes without asking first:

    prefill                                   decode
    (REGISTER carried the grant)                  the grant counts as a writer of the pages
    WRITE_GRANTED(room, offset, npages, heads) -> checks the frame fits the request (no reply)
    the backend writes the pages (memcpy into a mapped segment, a NIXL WRITE, a Mooncake write)
    WRITE_DONE(same fields) [+ META]          ->  counts the bytes; once all of this rank's
                                                  bytes and its META are in, the grant ends
    or, when prefill gives up: ABORT          ->  sent only once none of prefill's writes into
                                                  the room is under way or can start: grant ends

A receiver that fails or is aborted reports Failed only after its grants ended (decode_side.py
lists when), so freed pages are never written. gloo, two-sided, asks per write instead:

    WRITE_BEGIN(room, offset, npages, heads) ->   checks the receiver still wants them,
                                             <-   ACK ok (a write slot is held)
    the pages move; WRITE_DONE               ->   releases the slot, counts the bytes
"""

from __future__ import annotations

import logging
import socket
from abc import ABC, abstractmethod

import numpy as np

from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.decode_service import DataConn, DecodeTransferService
from pdserve.disagg.transfer.heads import head_range
from pdserve.disagg.transfer.prefill_service import Destination, Job
from pdserve.disagg.transfer.wire import FrameHeader, FrameType, ProtocolError

logger = logging.getLogger(__name__)


class OneSidedPrefillMover(ABC):
    # write under decode's standing grant when its REGISTER carries one (see above)
    standing_grant = True
    # the engine tells decode itself when a granted write landed, carrying the META record
    # of the last piece (nixl: the write's notification): decode counts the write then, and
    # WRITE_DONE, sent once prefill saw the write complete, only closes it (no META frame)
    meta_with_write = False

    def __init__(self, args: KVArgs) -> None:
        self.args = args

    @abstractmethod
    def check_registration(self, body: wire.RegisterBody, pages: np.ndarray) -> str | None: ...

    def close(self) -> None:
        """Release what the backend holds (after the service stopped)."""

    @abstractmethod
    def write(self, job: Job, dst_pages: np.ndarray, link: object) -> None:
        """Put the job's source pages into decode's `dst_pages`; return once they landed.
        `link`: what `connect` returned for this connection."""

    def connect(self, sock: socket.socket, job: Job, scratch: dict) -> object:
        """Per-connection set-up before the first write (gloo: its process group); None here."""
        return None

    def send_piece(self, sock: socket.socket, job: Job, scratch: dict, trailer: bytes = b"") -> int:
        dest, a = job.dest, self.args
        link = self.connect(sock, job, scratch)
        n = len(job.src_pages)
        h = FrameHeader(
            FrameType.WRITE_GRANTED if dest.granted else FrameType.WRITE_BEGIN,
            job.sender.room,
            src_rank=a.engine_rank,
            offset=job.offset,
            npages=n,
            head_start=dest.dst_heads[0],
            head_end=dest.dst_heads[1],
        )
        wire.send_frame(sock, h)
        if not dest.granted:
            ack = wire.read_ack(sock, job.sender.room)
            if not ack.ok:
                raise RuntimeError(f"decode refused the write: {ack.error}")
        dst_pages = dest.pages[job.offset : job.offset + n]
        if self.meta_with_write and dest.granted:
            self.write(job, dst_pages, link, meta=trailer[wire.HEADER_SIZE :])
            trailer = b""  # it went with the write
        else:
            self.write(job, dst_pages, link)
        if job.sender.done:  # failed during the write: no META (decode must not succeed)
            trailer = b""
        h.type = FrameType.WRITE_DONE
        wire.send_views(sock, [h.pack(), trailer])  # the META frame, when it is the last piece
        return n * (dest.src_heads[1] - dest.src_heads[0]) * (a.page_nbytes // a.num_kv_heads)


class OneSidedDecodeMover(ABC):
    # grant prefill the write of all of a request's pages with the REGISTER (see above)
    standing_grant = True
    # decode takes part in each write (gloo: receives, then scatters into its pages)
    two_sided = False

    def __init__(self, args: KVArgs, svc_getter) -> None:
        self.args = args
        self.head_page_nbytes = args.page_nbytes // args.num_kv_heads
        self._svc_getter = svc_getter

    @abstractmethod
    def register_extra(self) -> dict:
        """What prefill needs to write into this pool (RegisterBody fields)."""

    def close(self) -> None:
        """Release what the backend holds (after the service stopped)."""

    def join(self, conn: DataConn, h: FrameHeader) -> None:
        raise ProtocolError(f"{h.type.name} frames belong to the gloo backend")

    def receive(self, conn: DataConn, h: FrameHeader, pages: np.ndarray | None) -> bytes | None:
        """After granting a write: take part in it where the backend is two-sided (gloo; the
        decode pages); one-sided engines write without decode's help (nixl progresses
        its agent until the write's notification; pages may be None). A mover whose engine
        says when a granted write landed (nixl) returns once it did, with the META record
        that came with it (b"" when none); others return None."""
        return None

    def _reply(self, conn: DataConn, room: int, error: str | None) -> None:
        body = wire.encode_body(wire.AckBody(ok=error is None, error=error or ""))
        wire.send_frame(conn.sock, FrameHeader(FrameType.ACK, room, src_rank=self.args.engine_rank), body)

    def handle_frame(self, conn: DataConn, h: FrameHeader) -> None:
        svc: DecodeTransferService = self._svc_getter()
        if h.type == FrameType.DATA:
            raise ProtocolError("DATA frames belong to the tcp backend")
        if h.type == FrameType.GROUP_JOIN:
            self.join(conn, h)
            return
        svc.check_geometry(h)
        if h.payload_len:
            raise ProtocolError(f"{h.type.name} carries no payload")
        key = (h.room, h.src_rank, h.offset, h.npages, h.head_start, h.head_end)
        if h.type == FrameType.WRITE_GRANTED:
            if conn.grant is not None:
                raise ProtocolError("WRITE_GRANTED while a granted write is still open")
            if not self.standing_grant:
                raise ProtocolError("this backend grants each write (WRITE_BEGIN)")
            r = svc.granted(h.room)
            pages = None
            if r is None:  # its grant ended (an abort that timed out): nothing to protect any more
                logger.warning("write into room %d, which holds no standing grant, ignored", h.room)
            else:
                # ProtocolError -> connection closed. Two-sided (gloo): decode writes the pages
                # itself, holding a writer slot until it is done (None: receive, drop the bytes)
                pages = r.begin_granted(h, hold=self.two_sided)
            conn.grant = (r, key, True)
            try:
                meta = self.receive(conn, h, pages)
            finally:
                if self.two_sided and pages is not None:
                    r.end_write(0, False)  # counted at WRITE_DONE, as for the one-sided engines
            if meta is not None:  # the write landed: count it now, WRITE_DONE only closes it
                conn.grant = (r, key, "counted")
                if r is not None:
                    self._landed(svc, r, h, meta)
            return
        if h.type == FrameType.WRITE_BEGIN:
            if conn.grant is not None:
                raise ProtocolError("WRITE_BEGIN while a granted write is still open")
            r = svc.lookup(h.room)
            pages = r.begin_write(h) if r is not None else None  # ProtocolError -> connection closed
            if pages is None:
                self._reply(conn, h.room, f"room {h.room} is unknown or no longer accepts KV")
                return
            conn.grant = (r, key, False)
            self._reply(conn, h.room, None)
            self.receive(conn, h, pages)
        else:  # WRITE_DONE
            if conn.grant is None or conn.grant[1] != key:
                raise ProtocolError("WRITE_DONE without a matching WRITE_BEGIN")
            r, _, standing = conn.grant
            conn.grant = None
            nbytes = h.npages * (h.head_end - h.head_start) * self.head_page_nbytes
            if standing == "counted":
                pass  # counted when it landed (receive)
            elif standing:
                if r is not None:
                    r.granted_done(h.src_rank, nbytes)
            else:
                r.end_write(nbytes, True)

    def _landed(self, svc: DecodeTransferService, r, h: FrameHeader, meta: bytes) -> None:
        """A granted write landed (the engine said so): count its bytes, and take the META
        record that came with it (the last piece's), as a META frame would be taken."""
        r.granted_done(h.src_rank, h.npages * (h.head_end - h.head_start) * self.head_page_nbytes)
        if meta:
            svc.deliver_meta(r, h.src_rank, h.room, meta)

    def on_disconnect(self, conn: DataConn) -> None:
        if conn.grant is not None:
            r, key, standing = conn.grant
            conn.grant = None
            logger.warning("prefill disconnected during a granted write to room %d", key[0])
            if not standing:
                r.end_write(0, False)  # pages may be half written: the bytes do not count
            # a standing grant outlives the connection: prefill's other writes (or its
            # retry) may be under way; its ABORT or the other release rules end it


def host_port_error(meta: bytes | None, what: str) -> str | None:
    """Why `meta` (decode's registration field) is not "host:port", or None."""
    try:
        host, _, port = (meta or b"").decode().rpartition(":")
        if host and 0 < int(port) < 65536:
            return None
    except ValueError:
        pass
    return f"decode's {what} must be host:port"


def write_segments(
    args: KVArgs, dest: Destination, src_pages: np.ndarray, dst_pages: np.ndarray, src_base: int, dst_base: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src addresses, dst addresses, lengths) of the byte ranges that move `src_pages`
    (prefill's pool at `src_base`) into `dst_pages` (decode's pool at `dst_base`).

    Both pools are [num_pages, layers, 2, page_size, local_heads, head_dim]. With the same
    heads on both sides a page is one contiguous block, and runs of pages contiguous on both
    sides merge into one range. A head slice (different tp sizes) is one range per
    (page, layer, k/v, token) row.
    """
    elt = args.kv_data.element_size()
    src_heads_n = args.num_kv_heads
    d0h, d1h = head_range(dest.decode_rank, dest.decode_tp_size, args.layout.total_kv_heads)
    dst_heads_n = d1h - d0h
    s0, s1 = dest.src_heads
    t0, _ = dest.dst_heads
    row = args.head_dim * elt  # one head of one token
    src_page = args.page_nbytes
    dst_page = args.num_layers * 2 * args.page_size * dst_heads_n * row
    src_pages = np.asarray(src_pages, dtype=np.int64)
    dst_pages = np.asarray(dst_pages, dtype=np.int64)
    if (s0, s1) == (0, src_heads_n) and (t0, dest.dst_heads[1]) == (0, dst_heads_n):
        # whole pages: merge runs contiguous in both pools
        srcs, dsts, lens = [], [], []
        start = 0
        for i in range(1, len(src_pages) + 1):
            if i == len(src_pages) or src_pages[i] != src_pages[i - 1] + 1 or dst_pages[i] != dst_pages[i - 1] + 1:
                srcs.append(src_base + int(src_pages[start]) * src_page)
                dsts.append(dst_base + int(dst_pages[start]) * dst_page)
                lens.append((i - start) * src_page)
                start = i
        return np.array(srcs, np.uint64), np.array(dsts, np.uint64), np.array(lens, np.uint64)
    rows = np.arange(args.num_layers * 2 * args.page_size, dtype=np.int64)  # (layer, k/v, token) rows
    src = src_base + src_pages[:, None] * src_page + rows[None, :] * (src_heads_n * row) + s0 * row
    dst = dst_base + dst_pages[:, None] * dst_page + rows[None, :] * (dst_heads_n * row) + t0 * row
    n = src.size
    return (
        src.reshape(-1).astype(np.uint64),
        dst.reshape(-1).astype(np.uint64),
        np.full(n, (s1 - s0) * row, np.uint64),
    )
