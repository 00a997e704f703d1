"""Decode side of the socket backends (tcp, shm), per rank: the data listener prefill pushes
KV into, the bootstrap lookups and control connections to prefill ranks, the heartbeats.
The per-request receiver is in decode_side.py.

Safety rule: bytes are written into a request's pages only between `begin_write` and
`end_write`, and `begin_write` refuses once the receiver failed or was aborted. A failed
receiver reports Failed only after in-flight writes ended, so the scheduler may free its
pages as soon as poll() says Failed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pdserve.disagg.transfer.bootstrap import HeartbeatMonitor, RankInfo, fetch_route
from pdserve.disagg.metadata import KVMetadata, MetadataError
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import KVLayout, KVTransferError
from pdserve.disagg.transfer.listener import Listener
from pdserve.disagg.transfer.service_settings import ServiceSettings
from pdserve.disagg.transfer.wire import FrameHeader, FrameType, ProtocolError

logger = logging.getLogger(__name__)

MAX_DATA_CONNECTIONS = 512


@dataclass(eq=False)
class DataConn:
    """One connection from a prefill worker; `scratch` holds per-connection staging buffers."""

    sock: socket.socket
    peer: object
    scratch: dict = field(default_factory=dict)
    # one-sided: (receiver, frame key, standing) of the write prefill may be doing now
    grant: tuple | None = None


class DecodeMover(Protocol):
    def handle_frame(self, conn: DataConn, h: FrameHeader) -> None:
        """Handle a DATA / WRITE_BEGIN / WRITE_DONE frame (backend specific)."""

    def on_disconnect(self, conn: DataConn) -> None: ...

    def register_extra(self) -> dict:
        """Extra RegisterBody fields (shm: the segment name; nixl/mooncake: how to reach the pool)."""

    def close(self) -> None:
        """Release backend resources, after the service stopped."""


@dataclass(frozen=True)
class Route:
    """A prefill instance as its bootstrap server describes it."""

    addr: str
    tp_size: int
    ranks: dict[int, RankInfo]


class _ControlConn:
    """A request/ACK connection to one prefill rank's control endpoint (one call at a time)."""

    def __init__(self, ep: tuple[str, int], timeout: float) -> None:
        self.ep = ep
        self.timeout = timeout
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None

    def call(self, header: FrameHeader, body: bytes, payload: list, want_ack: bool = True) -> wire.AckBody | None:
        with self.lock:
            for attempt in (0, 1):
                reused = self.sock is not None
                try:
                    if self.sock is None:
                        self.sock = socket.create_connection(self.ep, timeout=min(self.timeout, 10.0))
                        self.sock.settimeout(self.timeout)
                        wire.tune_socket(self.sock, 1 << 20)
                    wire.send_frame(self.sock, header, body, payload)
                    return wire.read_ack(self.sock, header.room) if want_ack else None
                except (OSError, ProtocolError):
                    self.close_locked()
                    if attempt == 0 and reused:
                        continue
                    raise
        return None

    def close_locked(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def reset(self) -> None:
        """Drop the connection now, without waiting for a call in progress: shutting the
        socket down makes that call fail (it then closes it); otherwise close it here."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.lock.acquire(blocking=False):
            try:
                self.close_locked()
            finally:
                self.lock.release()


class Receiver(Protocol):
    """What the service and the movers use of a request's receiver (decode_side.py:
    SocketKVReceiver)."""

    room: int
    bootstrap_addr: str
    pages: np.ndarray | None  # the request's pages, once init() gave them
    route: Route | None  # the prefill ranks, once the bootstrap server answered
    sources: list[int]  # prefill ranks that send us heads
    registered: threading.Event  # every source prefill rank accepted our pages

    @property
    def done(self) -> bool: ...

    def set_route(self, route: Route) -> None: ...

    def on_meta(self, src_rank: int, meta: KVMetadata) -> None: ...

    def fail(self, reason: str, notify: bool = True, remove: bool = True) -> None: ...

    def begin_write(self, h: FrameHeader) -> np.ndarray | None: ...

    def end_write(self, nbytes: int, complete: bool) -> None: ...

    def take_standing(self, src: int) -> bool: ...

    def release_standing(self, src: int | None = None, why: str = "") -> None: ...

    def begin_granted(self, h: FrameHeader, hold: bool = False) -> np.ndarray | None: ...

    def granted_done(self, src: int, nbytes: int) -> None: ...


class DecodeTransferService:
    def __init__(self, mgr: ServiceSettings, mover: DecodeMover) -> None:
        self.mgr = mgr
        self.args = mgr.args
        self.mover = mover
        self.layout: KVLayout = mgr.args.layout
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)  # writers finishing
        self._receivers: dict[int, Receiver] = {}
        # receivers holding standing write grants, failed ones included (those leave
        # _receivers at once but keep their pages until every grant is released)
        self._granted: dict[int, Receiver] = {}
        self._routes: dict[str, Future[Route]] = {}
        self._ctrl: dict[tuple[str, int], _ControlConn] = {}
        self._heartbeats: dict[str, HeartbeatMonitor] = {}
        self._pool = ThreadPoolExecutor(max_workers=mgr.thread_pool_size, thread_name_prefix="kv-decode")
        # bytes of one KV head's share of a page: the unit every DATA payload is made of
        self.head_page_nbytes = self.args.page_nbytes // self.args.num_kv_heads

        self.listener = Listener(
            self.args.host,
            self.args.port,
            self._serve,
            name="kv-decode-data",
            max_conns=MAX_DATA_CONNECTIONS,
            lock=self.lock,
        )
        self._closed = self.listener.closed
        self.port = self.listener.port

    # -- data connections from prefill -----------------------------------------------------

    def table_sizes(self) -> dict[str, int]:
        """Per-request state held (memory debugging, engine/memdebug.py)."""
        return {"decode_receivers": len(self._receivers), "decode_conns": len(self.listener.conns)}

    def _serve(self, sock: socket.socket, peer: object) -> None:
        conn = DataConn(sock, peer)
        sock.settimeout(self.mgr.io_timeout)
        wire.tune_socket(sock)
        try:
            while not self._closed.is_set():
                h = wire.read_header(sock, keep_waiting=lambda: not self._closed.is_set())
                if h is None:
                    break
                if h.type == FrameType.META:
                    self._on_meta(sock, h)
                elif h.type == FrameType.ABORT:
                    reason = wire.read_abort_reason(sock, h)
                    r = self.lookup(h.room) or self.granted(h.room)
                    if r is not None:
                        r.fail(f"prefill aborted the transfer: {reason or 'no reason given'}", notify=False)
                        # prefill sends it only once none of its writes is under way or can start
                        r.release_standing(h.src_rank)
                elif h.type in (
                    FrameType.DATA,
                    FrameType.WRITE_BEGIN,
                    FrameType.WRITE_GRANTED,
                    FrameType.WRITE_DONE,
                    FrameType.GROUP_JOIN,
                ):
                    self.mover.handle_frame(conn, h)
                else:
                    raise ProtocolError(f"unexpected {h.type.name} frame on a data connection")
        except ProtocolError as e:
            logger.error("rejected frame from prefill %s: %s; closing the connection", conn.peer, e)
        except OSError as e:
            if not self._closed.is_set():
                logger.warning("KV data connection from %s ended: %r", conn.peer, e)
        finally:
            self.mover.on_disconnect(conn)

    def check_geometry(self, h: FrameHeader) -> None:
        """Limits any DATA/WRITE frame must meet, whatever its room (before reading a byte of it)."""
        if not (1 <= h.npages <= self.args.num_pages):
            raise ProtocolError(f"{h.type.name} for {h.npages} pages (this pool has {self.args.num_pages})")
        if not (h.head_start < h.head_end <= self.args.num_kv_heads):
            raise ProtocolError(
                f"head range [{h.head_start}, {h.head_end}) outside the {self.args.num_kv_heads} local heads"
            )
        if h.body_len:
            raise ProtocolError(f"{h.type.name} carries no body")

    def _on_meta(self, sock: socket.socket, h: FrameHeader) -> None:
        if h.payload_len != KVMetadata.SIZE or h.body_len:
            raise ProtocolError(f"META payload {h.payload_len} bytes, expected {KVMetadata.SIZE}")
        data = bytes(wire.recv_exact(sock, KVMetadata.SIZE))
        r = self.lookup(h.room) or self.granted(h.room)  # a failed one may wait for it to end a grant
        if r is None:
            logger.warning("metadata for unknown or finished room %d ignored", h.room)
            return
        self.deliver_meta(r, h.src_rank, h.room, data)

    def deliver_meta(self, r: "Receiver", src_rank: int, room: int, data: bytes) -> None:
        """A META record from prefill rank `src_rank` for `r` (a META frame's payload, or the
        one a nixl write's notification carried)."""
        try:
            meta = KVMetadata.unpack(data, expected_room=room)
        except MetadataError as e:
            r.fail(f"bad metadata record: {e}")
            return
        r.on_meta(src_rank, meta)

    # -- receivers -------------------------------------------------------------------------
    def lookup(self, room: int) -> "Receiver | None":
        with self.lock:
            return self._receivers.get(room)

    def add_receiver(self, r: "Receiver") -> None:
        if self._closed.is_set():
            r.fail("KV manager shut down", notify=False, remove=False)
            return
        with self.lock:
            if r.room in self._receivers or r.room in self._granted:  # (a failed one may hold pages)
                collision = True
            else:
                collision = False
                self._receivers[r.room] = r
                if r.bootstrap_addr not in self._heartbeats:
                    self._heartbeats[r.bootstrap_addr] = HeartbeatMonitor(
                        r.bootstrap_addr,
                        self.mgr.heartbeat_interval,
                        self.mgr.heartbeat_max_failure,
                        on_dead=self._on_prefill_dead,
                    )
                fut = self._routes.get(r.bootstrap_addr)
                if fut is None or (fut.done() and fut.exception() is not None):
                    fut = self._routes[r.bootstrap_addr] = self._pool.submit(self._resolve, r.bootstrap_addr)
        if collision:
            r.fail(
                "bootstrap_room collision: another request on this decode uses the same room",
                notify=False,
                remove=False,
            )
            return
        fut.add_done_callback(lambda f: self._on_route(r, f))

    def granted(self, room: int) -> "Receiver | None":
        with self.lock:
            return self._granted.get(room)

    def hold_granted(self, r: "Receiver") -> None:
        with self.lock:
            self._granted[r.room] = r

    def drop_granted(self, r: "Receiver") -> None:
        with self.lock:
            if self._granted.get(r.room) is r:
                del self._granted[r.room]

    def remove(self, r: "Receiver") -> None:
        with self.lock:
            if self._receivers.get(r.room) is r:
                del self._receivers[r.room]

    def _resolve(self, addr: str) -> Route:
        """Fetch prefill's route table; wait (bounded) until all its ranks registered."""
        deadline = time.monotonic() + self.mgr.bootstrap_timeout
        delay, last = 0.05, "no answer"
        while not self._closed.is_set():
            try:
                table = fetch_route(addr, timeout=min(5.0, self.mgr.io_timeout))
                if table.tp_size and len(table.ranks) == table.tp_size:
                    return Route(addr, table.tp_size, {i.engine_rank: i for i in table.ranks})
                last = f"{len(table.ranks)} of {table.tp_size or '?'} prefill ranks registered"
            except Exception as e:  # noqa: BLE001 - reported below if it persists
                last = repr(e)
            if time.monotonic() + delay > deadline:
                break
            self._closed.wait(delay)
            delay = min(delay * 2, 1.0)
        raise KVTransferError(0, f"prefill bootstrap server {addr} unusable: {last}")

    def _on_route(self, r: "Receiver", fut: Future) -> None:
        try:
            route = fut.result()
        except Exception as e:  # noqa: BLE001
            reason = e.reason if isinstance(e, KVTransferError) else repr(e)
            r.fail(reason, notify=False)
            return
        r.set_route(route)

    def submit_register(self, r: "Receiver") -> None:
        self._pool.submit(self._register, r)

    def _register(self, r: "Receiver") -> None:
        a, lay = self.args, self.layout
        assert r.route is not None and r.pages is not None
        extra = self.mover.register_extra()
        if getattr(self.mover, "standing_grant", False):
            extra["granted"] = True
        body = wire.encode_body(
            wire.RegisterBody(
                decode_rank=a.engine_rank,
                decode_tp_size=a.tp_size,
                host=a.host,
                port=self.port,
                backend=self.mgr.backend,
                page_size=lay.page_size,
                num_layers=lay.num_layers,
                total_kv_heads=lay.total_kv_heads,
                head_dim=lay.head_dim,
                dtype=lay.dtype,
                decode_num_pages=a.num_pages,
                **extra,
            )
        )
        payload = r.pages.astype("<u4").tobytes()
        standing = bool(getattr(self.mover, "standing_grant", False))
        for src in r.sources:
            if r.done:
                return
            info = r.route.ranks[src]
            # the grant goes with the REGISTER: it holds from before prefill can see it
            if standing and not r.take_standing(src):
                return
            try:
                ack = self._control(info).call(
                    FrameHeader(FrameType.REGISTER, r.room, src_rank=a.engine_rank, npages=len(r.pages)),
                    body,
                    [payload],
                )
            except (OSError, ProtocolError) as e:
                self._forget_route(r.bootstrap_addr)
                r.fail(f"could not reach prefill rank {src} at {info.rank_ip}:{info.rank_port}: {e!r}")
                if isinstance(e, ConnectionRefusedError):  # nothing reached prefill: it cannot write
                    r.release_standing(src)
                # otherwise prefill may hold the registration: the ABORT just sent (or the
                # heartbeats, or the I/O timeout) releases the grant
                return
            if ack is None or not ack.ok:
                r.fail(f"prefill rank {src} refused the request: {ack.error if ack else 'no reply'}", notify=False)
                r.release_standing(src)  # refused: it will not write
                return
        r.registered.set()

    def send_abort(self, r: "Receiver", reason: str) -> None:
        """Best effort: tell the prefill ranks this room is gone."""
        route = r.route
        if route is None or self._closed.is_set():
            return

        def run() -> None:
            body = wire.encode_body(wire.AckBody(ok=False, error=reason[:4000]))
            for src in r.sources:
                try:
                    self._control(route.ranks[src]).call(
                        FrameHeader(FrameType.ABORT, r.room, src_rank=self.args.engine_rank), body, [], want_ack=False
                    )
                except (OSError, ProtocolError, KeyError):
                    pass

        try:
            self._pool.submit(run)
        except RuntimeError:  # pool shut down
            pass

    def _control(self, info: RankInfo) -> _ControlConn:
        ep = (info.rank_ip, info.rank_port)
        with self.lock:
            c = self._ctrl.get(ep)
            if c is None:
                c = self._ctrl[ep] = _ControlConn(ep, self.mgr.io_timeout)
            return c

    def _forget_route(self, addr: str) -> None:
        with self.lock:
            fut = self._routes.pop(addr, None)
        if fut is not None and fut.done() and fut.exception() is None:
            for info in fut.result().ranks.values():
                with self.lock:
                    c = self._ctrl.get((info.rank_ip, info.rank_port))
                if c is not None:
                    c.reset()

    def _on_prefill_dead(self, addr: str, message: str) -> None:
        """Heartbeat verdict: fail the transfers from that prefill now, then drop its route.
        (Dropping the route used to come first and wait for the control connection's lock,
        held by a registration waiting on the dead prefill's ACK: the receivers failed only
        when the prefill came back or after the I/O timeout, #10.)"""
        with self.lock:
            victims = {id(r): r for r in self._receivers.values() if r.bootstrap_addr == addr}
            victims.update((id(r), r) for r in self._granted.values() if r.bootstrap_addr == addr)
        for r in victims.values():
            r.fail(message, notify=False)
            r.release_standing()  # that prefill is gone: nothing of it writes any more
        self._forget_route(addr)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self.listener.close()
        with self.lock:
            hbs = list(self._heartbeats.values())
            receivers = list({id(r): r for r in [*self._receivers.values(), *self._granted.values()]}.values())
            ctrls = list(self._ctrl.values())
        for hb in hbs:
            hb.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for c in ctrls:
            with c.lock:
                c.close_locked()
        for r in receivers:
            r.fail("KV manager shut down", notify=False)
            r.release_standing()
