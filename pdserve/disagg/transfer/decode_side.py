"""Decode side of the socket backends (tcp, shm), per request: the receiver (its state, the
pages it expects, which prefill ranks must send what). The per-rank socket service it
registers with is in decode_service.py, with the safety rule on writes into its pages.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from pdserve.disagg.transfer.bootstrap import split_addr
from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll, PollState
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import (
    BaseKVReceiver,
    KVLayout,
    KVTransferError,
    PageIndices,
    as_page_array,
    check_room,
)
from pdserve.disagg.transfer.decode_service import DecodeTransferService, Route
from pdserve.disagg.transfer.heads import peer_ranks, slice_mapping
from pdserve.disagg.transfer.wire import FrameHeader, ProtocolError

if TYPE_CHECKING:
    from pdserve.disagg.transfer.socket_manager import SocketKVManager

logger = logging.getLogger(__name__)


class SocketKVReceiver(BaseKVReceiver):
    """Decode-side receiver of the tcp and shm backends."""

    def __init__(
        self, mgr: "SocketKVManager", bootstrap_addr: str, bootstrap_room: int, data_parallel_rank: int | None = None
    ) -> None:
        if mgr.mode != DisaggregationMode.DECODE or mgr.decode is None:
            raise ValueError("a KV receiver needs a manager in decode mode")
        split_addr(bootstrap_addr)  # ValueError on a malformed address
        self.mgr = mgr
        self.svc: DecodeTransferService = mgr.decode
        self.bootstrap_addr = bootstrap_addr
        self.room = check_room(bootstrap_room)
        self._state = PollState(KVPoll.Bootstrapping)
        self.pages: np.ndarray | None = None
        self.route: Route | None = None
        self.sources: list[int] = []  # prefill ranks that send us heads
        self._dst_heads: dict[int, tuple[int, int]] = {}  # prefill rank -> our local heads it fills
        self.registered = threading.Event()  # set once every source prefill rank accepted our pages
        self.completed_at: float | None = None  # time.monotonic() when it reached Success
        self._t_init: float | None = None
        self._t_first_byte: float | None = None
        # guarded by svc.lock
        self._registered = False
        self._writers = 0
        self._accepting = True
        self._pending_fail: str | None = None
        self._bytes = 0
        self._expected_bytes = 0
        self._meta_from: set[int] = set()
        self._metadata: KVMetadata | None = None
        self.svc.add_receiver(self)

    @property
    def done(self) -> bool:
        """Success or Failed: no more work for the transfer service."""
        return self._state.done

    def set_route(self, route: Route) -> None:
        a = self.mgr.args
        info = next(iter(route.ranks.values()))
        theirs = KVLayout(info.page_size, info.num_layers, info.total_kv_heads, info.head_dim, info.dtype)
        diff = self.svc.layout.mismatch(theirs)
        if diff:
            self.fail(f"KV layout mismatch between decode and prefill {route.addr} ({diff})")
            return
        if info.backend != self.mgr.backend:
            self.fail(
                f"prefill {route.addr} uses transfer backend {info.backend!r}, this decode uses {self.mgr.backend!r}"
            )
            return
        try:
            sources = peer_ranks(a.engine_rank, a.tp_size, route.tp_size, a.layout.total_kv_heads)
        except ValueError as e:
            self.fail(str(e))
            return
        with self.svc.lock:
            self.route = route
            self.sources = sources
            for s in sources:
                m = slice_mapping(s, route.tp_size, a.engine_rank, a.tp_size, a.layout.total_kv_heads)
                assert m is not None
                self._dst_heads[s] = m[1]
            register = self.pages is not None and not self._registered
            self._registered |= register
        self._state.advance(KVPoll.WaitingForInput)
        if register:
            self.svc.submit_register(self)

    def init(self, page_indices: PageIndices) -> None:
        pages = as_page_array(page_indices, self.mgr.args.num_pages)
        if not (1 <= len(pages) <= wire.MAX_PAGES_PER_ROOM):
            raise ValueError(f"a request needs 1..{wire.MAX_PAGES_PER_ROOM} pages, got {len(pages)}")
        if np.unique(pages).size != pages.size:
            raise ValueError("duplicate page indices")
        with self.svc.lock:
            if self.pages is not None:
                raise RuntimeError("init() called twice")
            self.pages = pages
            self._expected_bytes = len(pages) * self.mgr.args.page_nbytes
            self._t_init = time.monotonic()
            register = self.route is not None and not self._registered
            self._registered |= register
        if register:
            self.svc.submit_register(self)

    # -- called by connection threads --------------------------------------------------------
    def begin_write(self, h: FrameHeader) -> np.ndarray | None:
        """Decode page ids the frame covers, with a write slot held; None when the receiver no
        longer accepts data (failed/aborted: drain it). ProtocolError when the frame does not
        fit this request (the receiver fails)."""
        with self.svc.lock:
            if not self._accepting or self._state.done:
                return None
            err = None
            if self.pages is None:
                err = "data before init()"
            elif h.offset + h.npages > len(self.pages):
                err = f"pages [{h.offset}, {h.offset + h.npages}) outside the request's {len(self.pages)} pages"
            elif self._dst_heads.get(h.src_rank) != (h.head_start, h.head_end):
                err = f"prefill rank {h.src_rank} may not write heads [{h.head_start}, {h.head_end})"
            if err is not None:
                self.fail(f"malformed {h.type.name} frame: {err}")
                raise ProtocolError(f"room {self.room}: {err}")
            self._writers += 1
            if self._t_first_byte is None:
                self._t_first_byte = time.monotonic()
            assert self.pages is not None
            pages = self.pages[h.offset : h.offset + h.npages]
        self._state.advance(KVPoll.Transferring)
        return pages

    def end_write(self, nbytes: int, complete: bool) -> None:
        with self.svc.lock:
            self._writers -= 1
            if complete:
                self._bytes += nbytes
                if self._bytes > self._expected_bytes:
                    self.fail(f"received {self._bytes} KV bytes, expected {self._expected_bytes}")
            if self._writers == 0:
                if self._pending_fail is not None:
                    self._finish_fail_locked()
                self.svc.cond.notify_all()
            self._maybe_succeed_locked()

    def on_meta(self, src_rank: int, meta: KVMetadata) -> None:
        with self.svc.lock:
            if src_rank not in self._dst_heads:
                logger.error("room %d: metadata from prefill rank %d, which sends it no heads", self.room, src_rank)
                return
            self._meta_from.add(src_rank)
            if self._metadata is None:
                self._metadata = meta
            self._maybe_succeed_locked()

    @property
    def transfer_seconds(self) -> float | None:
        """From the first KV byte (or the write grant) to Success; None before Success."""
        if self.completed_at is None:
            return None
        return self.completed_at - (self._t_first_byte or self._t_init or self.completed_at)

    def _maybe_succeed_locked(self) -> None:
        if (
            self._accepting
            and self._writers == 0
            and self.pages is not None
            and self.sources
            and self._bytes == self._expected_bytes
            and self._meta_from.issuperset(self.sources)
        ):
            # the record is complete before the state flips: the scheduler, woken by the
            # flip, reads transfer_seconds at once
            self.completed_at = now = time.monotonic()
            if not self._state.advance(KVPoll.Success):
                self.completed_at = None
            else:
                self._accepting = False
                t0 = self._t_first_byte or self._t_init or now
                self.mgr._stats.record_success(self._bytes, now - t0)
                self.svc.remove(self)

    def fail(self, reason: str, notify: bool = True, remove: bool = True) -> None:
        with self.svc.lock:
            if self._state.done or self._pending_fail is not None:
                return
            self._accepting = False
            self._pending_fail = reason
            if self._writers == 0:
                self._finish_fail_locked()
            if remove:
                self.svc.remove(self)
        logger.warning("KV receiver room %d failed: %s", self.room, reason)
        if notify:
            self.svc.send_abort(self, reason)

    def _finish_fail_locked(self) -> None:
        assert self._pending_fail is not None
        if self._state.fail(self._pending_fail):
            self.mgr._stats.record_failure()

    # -- scheduler API ---------------------------------------------------------------------
    def poll(self) -> KVPoll:
        if (
            self._t_init is not None
            and not self._state.done
            and time.monotonic() - self._t_init > self.mgr.waiting_timeout
        ):
            self.fail(
                f"KV did not arrive within {self.mgr.waiting_timeout:g}s of init() "
                "(SGLANG_DISAGGREGATION_WAITING_TIMEOUT)"
            )
        return self._state.state

    def get_metadata(self) -> KVMetadata | None:
        return self._metadata if self._state.state == KVPoll.Success else None

    @property
    def failure_reason(self) -> str | None:
        return self._state.reason or self._pending_fail

    def failure_exception(self) -> NoReturn:
        raise KVTransferError(self.room, self.failure_reason or "unknown failure")

    @property
    def busy(self) -> bool:
        """A connection thread is still writing into this request's pages: they may not be
        reused yet. After a failure or abort, poll() turns Failed once it is not."""
        return self._writers > 0

    def abort(self) -> None:
        """Fail the transfer and tell prefill; returns at once. A write already under way
        finishes (or ends with its connection) on its own thread: the caller frees the pages
        once `busy` is False. (This used to wait for it here, up to the I/O timeout, on the
        scheduler's thread: a prefill paused mid-frame froze every decode for as long, #10.)"""
        self.fail("aborted by the decode scheduler")
