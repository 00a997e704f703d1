"""Prefill side of the socket backends (tcp, shm), per rank: the control listener that takes
decode's page indices, the transfer queues and worker threads. The per-request sender is in
prefill_side.py.

Threads: one accept loop + one handler per decode control connection; `queue_size` queues,
each drained by `thread_pool_size // queue_size` (at least 1) workers. A worker owns its own
connections to decode data endpoints (no socket is shared between threads). A request's
pages are cut into up to `queue_size` pieces spread over the queues, so one big request uses
several connections and many small requests share them.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pdserve.disagg.transfer.bootstrap import RankInfo, register_rank
from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import KVLayout
from pdserve.disagg.transfer.heads import peer_ranks, slice_mapping
from pdserve.disagg.transfer.listener import Listener
from pdserve.disagg.transfer.service_settings import ServiceSettings
from pdserve.disagg.transfer.wire import FrameHeader, FrameType, ProtocolError

logger = logging.getLogger(__name__)

MAX_ROOMS = 1 << 16  # rooms tracked at once (pending registrations + live senders)
MIN_PIECE_BYTES = 8 << 20  # do not split a request into pieces smaller than this


@dataclass(eq=False)
class Destination:
    """One decode rank's registration for a room."""

    decode_rank: int
    decode_tp_size: int
    host: str
    port: int
    pages: np.ndarray  # int64 decode page ids, in request order
    src_heads: tuple[int, int]  # prefill-local heads to send
    dst_heads: tuple[int, int]  # where they go among decode's local heads
    decode_num_pages: int
    shm_name: str | None = None
    engine_meta: bytes | None = None  # nixl / mooncake: how to reach decode's pool
    kv_ptr: int | None = None  # nixl / mooncake: address of decode's pool
    outstanding: int = 0  # queued pieces not yet written (guarded by the service lock)
    meta_queued: bool = False
    # one-sided: decode granted the write of all its pages with the REGISTER (standing grant);
    # whether the ABORT that releases the grant was queued (once the sender failed and no
    # write is under way). `writing`: pieces being written to this destination now, on every
    # backend (guarded by the service lock; they read prefill's pages, see Sender.begin_write)
    granted: bool = False
    writing: int = 0
    released: bool = False

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.host, self.port


@dataclass(eq=False)
class Job:
    kind: str  # "piece" | "meta" | "abort"
    sender: "Sender"
    dest: Destination
    offset: int = 0  # position of src_pages[0] in the request's page list
    src_pages: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    reason: str = ""
    # piece: None until a worker takes it; then True when it is dest's last piece and its
    # META frame rides in the same system call as the piece's last frame (no separate send)
    with_meta: bool | None = None


class PrefillMover(Protocol):
    """What a backend does on the prefill side. A mover with `standing_grant = True` writes
    under decode's standing grant when the registration carries one (one_sided.py)."""

    def check_registration(self, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        """An error message to refuse decode's registration, or None."""

    def send_piece(self, sock: socket.socket, job: Job, scratch: dict, trailer: bytes = b"") -> int:
        """Move the piece's pages to decode; return the KV bytes moved. `scratch` is per worker.
        `trailer` (a whole frame, or empty) goes out with the piece's last frame, in one call."""

    def close(self) -> None:
        """Release backend resources, after the service stopped."""


@dataclass(frozen=True)
class RoomRef:
    """Stands for a sender in an ABORT job of a room whose sender never came (only .room
    is read)."""

    room: int
    done: bool = True


@dataclass(eq=False)
class RoomEntry:
    dests: dict[int, Destination] = field(default_factory=dict)
    required: int | None = None  # decode ranks that must register (from decode's tp size)
    sender: "Sender | None" = None
    created: float = field(default_factory=time.monotonic)
    aborted: str | None = None  # decode aborted before prefill created the sender


class Sender(Protocol):
    """What the service and the movers use of a request's sender (prefill_side.py:
    SocketKVSender)."""

    room: int
    metadata: KVMetadata | None  # sent after the last page

    @property
    def done(self) -> bool: ...

    def slice_nbytes(self, dest: Destination) -> int: ...

    def update_locked(self, entry: RoomEntry) -> None: ...

    def piece_done(self, dest: Destination, nbytes: int) -> bool: ...

    def claim_meta(self, dest: Destination) -> bool: ...

    def meta_sent(self, dest: Destination) -> None: ...

    def fail(self, reason: str, notify_decode: bool = True, detach: bool = True) -> None: ...

    def begin_write(self, dest: Destination) -> bool: ...

    def end_write(self, dest: Destination) -> None: ...


class PrefillTransferService:
    def __init__(self, mgr: ServiceSettings, mover: PrefillMover) -> None:
        self.mgr = mgr
        self.args = mgr.args
        self.mover = mover
        self.layout: KVLayout = mgr.args.layout
        self.lock = threading.RLock()  # senders call back into the service while holding it
        self._rooms: dict[int, RoomEntry] = {}
        self._last_sweep = time.monotonic()
        self.registered = threading.Event()  # set once the bootstrap server has our endpoint
        self.listener = Listener(
            self.args.host, self.args.port, self._serve_control, name="kv-prefill-ctrl", max_conns=1024, lock=self.lock
        )
        self._closed = self.listener.closed
        self.port = self.listener.port
        self._threads: list[threading.Thread] = []
        nq = mgr.queue_size
        self._queues: list[queue.SimpleQueue[Job | None]] = [queue.SimpleQueue() for _ in range(nq)]
        per_queue = max(1, mgr.thread_pool_size // nq)
        for qi, q in enumerate(self._queues):
            for k in range(per_queue):
                self._threads.append(
                    threading.Thread(target=self._worker, args=(q,), name=f"kv-send-{qi}.{k}", daemon=True)
                )
        if mgr.register_with_bootstrap:
            self._threads.append(threading.Thread(target=self._register_loop, name="kv-prefill-register", daemon=True))
        for t in self._threads:
            t.start()

    # -- bootstrap registration ------------------------------------------------------------

    def table_sizes(self) -> dict[str, int]:
        """Per-request state held (memory debugging, engine/memdebug.py)."""
        return {"prefill_rooms": len(self._rooms), "prefill_conns": len(self.listener.conns)}

    def rank_info(self) -> RankInfo:
        a, lay = self.args, self.layout
        return RankInfo(
            engine_rank=a.engine_rank,
            tp_size=a.tp_size,
            rank_ip=a.host,
            rank_port=self.port,
            backend=self.mgr.backend,
            page_size=lay.page_size,
            num_layers=lay.num_layers,
            total_kv_heads=lay.total_kv_heads,
            head_dim=lay.head_dim,
            dtype=lay.dtype,
        )

    def _register_loop(self) -> None:
        addr = f"{self.args.bootstrap_host}:{self.args.bootstrap_port}"
        deadline = time.monotonic() + self.mgr.bootstrap_timeout
        delay = 0.05
        while not self._closed.is_set():
            try:
                register_rank(addr, self.rank_info())
                self.registered.set()
                return
            except Exception as e:  # noqa: BLE001 - the server may not be up yet; retry
                if time.monotonic() > deadline:
                    logger.error(
                        "could not register prefill rank %d with bootstrap server %s: %s",
                        self.args.engine_rank,
                        addr,
                        e,
                    )
                    return
            self._closed.wait(delay)
            delay = min(delay * 2, 1.0)

    # -- control connections from decode -------------------------------------------------------
    def _serve_control(self, conn: socket.socket, peer: object) -> None:
        conn.settimeout(self.mgr.io_timeout)
        wire.tune_socket(conn, 1 << 20)
        try:
            while not self._closed.is_set():
                h = wire.read_header(conn, keep_waiting=lambda: not self._closed.is_set())
                if h is None:
                    break
                if h.type == FrameType.REGISTER:
                    self._on_register(conn, h)
                elif h.type == FrameType.ABORT:
                    self._on_decode_abort(h.room, wire.read_abort_reason(conn, h))
                else:
                    raise ProtocolError(f"unexpected {h.type.name} frame on the control channel")
        except ProtocolError as e:
            logger.error("rejected frame from decode %s: %s; closing the connection", peer, e)
        except OSError as e:
            if not self._closed.is_set():
                logger.debug("control connection from %s ended: %s", peer, e)

    def _on_register(self, conn: socket.socket, h: FrameHeader) -> None:
        # framing limits first: nothing is read or allocated before these hold
        if not (1 <= h.npages <= wire.MAX_PAGES_PER_ROOM):
            raise ProtocolError(f"REGISTER for {h.npages} pages (limit {wire.MAX_PAGES_PER_ROOM})")
        if h.payload_len != 4 * h.npages:
            raise ProtocolError(f"REGISTER payload {h.payload_len} bytes != 4 x {h.npages} pages")
        body = wire.decode_register(bytes(wire.recv_exact(conn, h.body_len)))
        if h.npages > body.decode_num_pages:
            raise ProtocolError(f"REGISTER for {h.npages} pages, decode's pool has {body.decode_num_pages}")
        pages = np.frombuffer(wire.recv_exact(conn, h.payload_len), dtype="<u4").astype(np.int64)
        error = self._check_register(h, body, pages)
        if error is None:
            error = self._add_destination(h.room, body, pages)
        if error is not None:
            logger.error("refused decode rank %d's registration of room %d: %s", body.decode_rank, h.room, error)
        reply = wire.encode_body(wire.AckBody(ok=error is None, error=error or ""))
        wire.send_frame(conn, FrameHeader(FrameType.ACK, h.room, src_rank=self.args.engine_rank), reply)

    def _check_register(self, h: FrameHeader, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        if body.backend != self.mgr.backend:
            return f"decode uses transfer backend {body.backend!r}, this prefill uses {self.mgr.backend!r}"
        theirs = KVLayout(body.page_size, body.num_layers, body.total_kv_heads, body.head_dim, body.dtype)
        diff = self.layout.mismatch(theirs)
        if diff:
            return f"KV layout mismatch between prefill and decode ({diff})"
        if body.decode_rank >= body.decode_tp_size:
            return f"decode rank {body.decode_rank} >= its tp size {body.decode_tp_size}"
        if body.granted and not getattr(self.mover, "standing_grant", False):
            return f"decode granted standing writes, which the {self.mgr.backend} backend does not use"
        if body.total_kv_heads < body.decode_tp_size:
            return f"{body.total_kv_heads} KV heads do not split over decode tp size {body.decode_tp_size}"
        if int(pages.max()) >= body.decode_num_pages:
            return f"page index {int(pages.max())} outside decode's pool of {body.decode_num_pages} pages"
        if np.unique(pages).size != pages.size:
            return "duplicate page indices"
        if (
            slice_mapping(
                self.args.engine_rank,
                self.args.tp_size,
                body.decode_rank,
                body.decode_tp_size,
                self.layout.total_kv_heads,
            )
            is None
        ):
            return f"decode rank {body.decode_rank} shares no KV heads with prefill rank {self.args.engine_rank}"
        return self.mover.check_registration(body, pages)

    def _add_destination(self, room: int, body: wire.RegisterBody, pages: np.ndarray) -> str | None:
        a = self.args
        mapping = slice_mapping(
            a.engine_rank, a.tp_size, body.decode_rank, body.decode_tp_size, self.layout.total_kv_heads
        )
        assert mapping is not None
        dest = Destination(
            body.decode_rank,
            body.decode_tp_size,
            body.host,
            body.port,
            pages,
            mapping[0],
            mapping[1],
            body.decode_num_pages,
            body.shm_name,
            body.engine_meta,
            body.kv_ptr,
            granted=body.granted,
        )
        required = len(peer_ranks(a.engine_rank, a.tp_size, body.decode_tp_size, self.layout.total_kv_heads))
        with self.lock:
            self._sweep_locked()
            entry = self._rooms.get(room)
            if entry is None:
                if len(self._rooms) >= MAX_ROOMS:
                    return f"too many rooms in flight ({MAX_ROOMS})"
                entry = self._rooms[room] = RoomEntry()
            if body.decode_rank in entry.dests:
                return f"room already registered by decode rank {body.decode_rank}"
            if entry.aborted is not None:
                return f"decode aborted the room: {entry.aborted}"
            if entry.required is not None and entry.required != required:
                return "decode ranks of one room disagree on the decode tp size"
            entry.required = required
            entry.dests[body.decode_rank] = dest
            if entry.sender is not None:
                entry.sender.update_locked(entry)
        return None

    def _on_decode_abort(self, room: int, reason: str) -> None:
        with self.lock:
            entry = self._rooms.get(room)
            if entry is None:
                return
            if entry.sender is None:
                entry.aborted = reason or "decode aborted"
                # no sender, so no write: release decode's standing grants now
                jobs = release_jobs_locked(RoomRef(room), entry.dests.values(), entry.aborted)
            else:
                jobs = []
            sender = entry.sender
        if sender is None:
            self.submit(jobs)
            return
        sender.fail(f"decode aborted the request: {reason or 'no reason given'}", notify_decode=False)

    def _sweep_locked(self) -> None:
        """Forget registrations no sender claimed within the bootstrap timeout."""
        now = time.monotonic()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        stale = [r for r, e in self._rooms.items() if e.sender is None and now - e.created > self.mgr.bootstrap_timeout]
        jobs = []
        for r in stale:
            jobs += release_jobs_locked(RoomRef(r), self._rooms.pop(r).dests.values(), "no prefill request claimed it")
        self.submit(jobs)
        if stale:
            logger.warning("dropped %d decode registrations that no prefill request claimed", len(stale))

    # -- senders ---------------------------------------------------------------------------
    def attach(self, sender: "Sender") -> None:
        with self.lock:
            entry = self._rooms.get(sender.room)
            if entry is None:
                if len(self._rooms) >= MAX_ROOMS:
                    reason = f"too many rooms in flight ({MAX_ROOMS})"
                else:
                    entry = self._rooms[sender.room] = RoomEntry()
                    reason = None
            elif entry.sender is not None:
                reason = "bootstrap_room collision: another request on this prefill uses the same room"
                entry = None
            else:
                reason = entry.aborted
            if entry is not None and reason is None:
                entry.sender = sender
                entry.created = time.monotonic()
                sender.update_locked(entry)
                return
        sender.fail(reason or "could not attach", notify_decode=False, detach=False)

    def detach(self, sender: "Sender") -> None:
        with self.lock:
            entry = self._rooms.get(sender.room)
            if entry is not None and entry.sender is sender:
                del self._rooms[sender.room]

    def submit(self, jobs: list[Job]) -> None:
        nq = len(self._queues)
        for i, job in enumerate(jobs):
            self._queues[(job.sender.room + i) % nq].put(job)

    def split_pieces(self, sender: "Sender", dest: Destination, pages: np.ndarray, offset: int) -> list[Job]:
        if len(pages) == 0:
            return []
        min_piece = min(MIN_PIECE_BYTES, getattr(self.mover, "min_piece_bytes", MIN_PIECE_BYTES))
        max_pieces = min(len(self._queues), getattr(self.mover, "max_pieces", len(self._queues)))
        # as many pieces as fit whole: none smaller than min_piece (a 1 MB transfer is one
        # piece on one worker: a second stream's hand-offs cost more than its copy saves)
        nbytes = len(pages) * sender.slice_nbytes(dest)
        npieces = max(1, min(max_pieces, len(pages), nbytes // max(1, min_piece)))
        bounds = [len(pages) * i // npieces for i in range(npieces + 1)]  # as even as they go
        return [Job("piece", sender, dest, offset + lo, pages[lo:hi]) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]

    # -- workers ---------------------------------------------------------------------------
    def _connect(self, ep: tuple[str, int]) -> socket.socket:
        sock = socket.create_connection(ep, timeout=min(self.mgr.io_timeout, 10.0))
        sock.settimeout(self.mgr.io_timeout)
        wire.tune_socket(sock)
        self.listener.track(sock)  # shut down with the service
        return sock

    def _drop(self, conns: dict, ep: tuple[str, int]) -> None:
        sock = conns.pop(ep, None)
        if sock is not None:
            self.listener.untrack(sock)
            sock.close()

    def _worker(self, q: "queue.SimpleQueue[Job | None]") -> None:
        conns: dict[tuple[str, int], socket.socket] = {}
        scratch: dict = {}
        while True:
            job = q.get()
            if job is None:
                break
            if job.kind != "abort" and job.sender.done:
                continue  # failed or aborted meanwhile: skip its remaining pieces
            ep = job.dest.endpoint
            for attempt in (0, 1):
                reused = ep in conns
                try:
                    if not reused:
                        conns[ep] = self._connect(ep)
                    self._run_job(conns[ep], job, scratch)
                    break
                except Exception as e:  # noqa: BLE001 - any failure fails this request only
                    self._drop(conns, ep)
                    if attempt == 0 and reused and isinstance(e, OSError) and not isinstance(e, TimeoutError):
                        continue  # a stale kept-alive connection: retry once on a fresh one
                    if job.kind != "abort":
                        job.sender.fail(f"sending KV to decode {ep[0]}:{ep[1]} failed: {e!r}")
                    break
        for ep in list(conns):
            self._drop(conns, ep)

    def _run_job(self, sock: socket.socket, job: Job, scratch: dict) -> None:
        sender, dest = job.sender, job.dest
        if job.kind == "abort":
            body = wire.encode_body(wire.AckBody(ok=False, error=job.reason[:4000]))
            wire.send_frame(sock, FrameHeader(FrameType.ABORT, sender.room, src_rank=self.args.engine_rank), body)
            return
        if job.kind == "piece":
            if not sender.begin_write(dest):
                return  # the sender failed: its pages may be freed, nothing more is written
            try:
                if job.with_meta is None:
                    job.with_meta = sender.claim_meta(dest)
                trailer = self._meta_frame(sender) if job.with_meta else b""
                nbytes = self.mover.send_piece(sock, job, scratch, trailer)
            finally:
                sender.end_write(dest)
            if job.with_meta:
                sender.piece_done(dest, nbytes)
                sender.meta_sent(dest)
                return
            if not sender.piece_done(dest, nbytes):
                return
            job.kind = "meta"  # a retry after this point resends only the metadata
        wire.send_views(sock, [self._meta_frame(sender)])
        sender.meta_sent(dest)

    def _meta_frame(self, sender: "Sender") -> bytes:
        """The META frame (header + record) of a sender whose last chunk was queued."""
        meta = sender.metadata
        assert meta is not None
        record = meta.pack()
        h = FrameHeader(FrameType.META, sender.room, src_rank=self.args.engine_rank, payload_len=len(record))
        return h.pack() + record

    def close(self) -> None:
        if self._closed.is_set():
            return
        for q in self._queues:
            for _ in range(max(1, self.mgr.thread_pool_size // len(self._queues))):
                q.put(None)
        self.listener.close()
        for t in self._threads:
            t.join(timeout=5)
        with self.lock:
            senders = [e.sender for e in self._rooms.values() if e.sender is not None]
        for sender in senders:
            sender.fail("KV manager shut down", notify_decode=False)


def release_jobs_locked(sender: "Sender | RoomRef", dests, reason: str) -> list[Job]:
    """ABORT jobs that release decode's standing grants of `dests` (service lock held): for
    each granted destination with no write under way and no release queued yet. A write
    under way queues its own when it ends (Sender.end_write)."""
    jobs = []
    for d in dests:
        if d.granted and not d.released and d.writing == 0:
            d.released = True
            jobs.append(Job("abort", sender, d, reason=reason))  # type: ignore[arg-type]
    return jobs
