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
        # standing grants (one-sided backends): source prefill ranks that may write our pages
        # without asking first; each counts as one writer until released (see take_standing)
        self._standing: set[int] = set()
        self._src_bytes: dict[int, int] = {}
        self._failed_at: float | None = None
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
            pages = self._check_frame_locked(h)
            if pages is None:
                return None
            self._writers += 1
            if self._t_first_byte is None:
                self._t_first_byte = time.monotonic()
        self._state.advance(KVPoll.Transferring)
        return pages

    def _check_frame_locked(self, h: FrameHeader) -> np.ndarray | None:
        """The decode pages a DATA / WRITE frame covers; None when the receiver no longer
        accepts data; ProtocolError (and the receiver fails) when it does not fit."""
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
        assert self.pages is not None
        return self.pages[h.offset : h.offset + h.npages]

    # -- standing grants (one-sided backends: shm, nixl, mooncake) ------------------------------
    # Decode grants a source prefill rank the write of all the request's pages with its
    # REGISTER, so prefill writes at once (WRITE_GRANTED, the write, WRITE_DONE) instead of
    # asking first (WRITE_BEGIN -> ACK, one round trip per piece). The grant counts as a writer
    # from before the REGISTER leaves until it is released, and a failed receiver reports Failed
    # only once no writer is left, so the pages are never freed under a write. Released when:
    # all of that source's bytes and its META arrived (Success); prefill's ABORT (it sends one
    # only once none of its writes into the room is under way and none will start); prefill
    # refused the registration or could not be reached at all; its heartbeats failed (the
    # process is gone); shutdown; or, for a live prefill that never answers an abort, after
    # the I/O timeout (the same bound a granted write had before: its socket's timeout).

    def take_standing(self, src: int) -> bool:
        """Grant `src` the write of all our pages; False when the receiver is done."""
        with self.svc.lock:
            if not self._accepting or self._state.done:
                return False
            self._standing.add(src)
            self._writers += 1
            self.svc.hold_granted(self)
            return True

    def release_standing(self, src: int | None = None, why: str = "") -> None:
        """End `src`'s standing grant (all of them when None)."""
        with self.svc.lock:
            srcs = list(self._standing) if src is None else [src] if src in self._standing else []
            if not srcs:
                return
            self._standing.difference_update(srcs)
            if why:
                logger.warning("room %d: standing write grant of prefill rank(s) %s released: %s", self.room, srcs, why)
            if not self._standing:
                self.svc.drop_granted(self)
            self.end_write_locked(0, False, len(srcs))

    def begin_granted(self, h: FrameHeader, hold: bool = False) -> np.ndarray | None:
        """A WRITE_GRANTED frame: the decode pages it covers, checked like a WRITE_BEGIN; None
        when the receiver no longer accepts data (the write still lands in pages that the grant
        keeps from being freed). ProtocolError when the frame does not fit the request or the
        source holds no standing grant. `hold`: decode writes the pages itself (gloo's
        scatter), holding a writer slot until `end_write`: prefill's write may end, and its
        grant with it, before decode's copy does."""
        with self.svc.lock:
            if h.src_rank not in self._standing:
                raise ProtocolError(f"room {self.room}: prefill rank {h.src_rank} holds no standing write grant")
            pages = self._check_frame_locked(h)
            if pages is None:
                return None
            if hold:
                self._writers += 1
            if self._t_first_byte is None:
                self._t_first_byte = time.monotonic()
        self._state.advance(KVPoll.Transferring)
        return pages

    def granted_done(self, src: int, nbytes: int) -> None:
        """The WRITE_DONE of a write under a standing grant. Counted per source even after a
        failure: a source whose bytes and META all came writes nothing more, so its grant
        ends without waiting for its answer to our ABORT (it may have finished already)."""
        with self.svc.lock:
            self._src_bytes[src] = self._src_bytes.get(src, 0) + nbytes
            if self._accepting and not self._state.done:
                self._add_bytes_locked(nbytes)
            self._release_if_complete_locked(src)
            self._maybe_succeed_locked()

    def _release_if_complete_locked(self, src: int) -> None:
        """`src` sent all its bytes and its META: it writes nothing more, its grant ends."""
        if src not in self._standing or src not in self._meta_from or self.pages is None:
            return
        d0, d1 = self._dst_heads[src]
        if self._src_bytes.get(src, 0) == len(self.pages) * (d1 - d0) * self.svc.head_page_nbytes:
            self.release_standing(src)

    def _check_stale_grants(self) -> None:
        """A failed receiver whose standing grants a live prefill never released: give up
        waiting after the I/O timeout (the bound a granted write's socket had)."""
        t = self._failed_at
        if t is not None and self._standing and time.monotonic() - t > self.mgr.io_timeout:
            self.release_standing(None, f"no release from prefill within {self.mgr.io_timeout:g}s of the failure")

    def _add_bytes_locked(self, nbytes: int) -> None:
        """Count bytes that landed in our pages; more than the request's pages hold fails it."""
        self._bytes += nbytes
        if self._bytes > self._expected_bytes:
            self.fail(f"received {self._bytes} KV bytes, expected {self._expected_bytes}")

    def end_write(self, nbytes: int, complete: bool) -> None:
        with self.svc.lock:
            self.end_write_locked(nbytes, complete)

    def end_write_locked(self, nbytes: int, complete: bool, writers: int = 1) -> None:
        self._writers -= writers
        if complete:
            self._add_bytes_locked(nbytes)
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
            self._release_if_complete_locked(src_rank)
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
            self._failed_at = time.monotonic()
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
        if self._standing and self._failed_at is not None:
            self._check_stale_grants()
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
        reused yet. After a failure or abort, poll() turns Failed once it is not. (A standing
        write grant counts: prefill may be writing without having said so yet.)"""
        if self._standing and self._failed_at is not None:
            self._check_stale_grants()
        return self._writers > 0

    def abort(self) -> None:
        """Fail the transfer and tell prefill; returns at once. A write already under way
        finishes (or ends with its connection) on its own thread: the caller frees the pages
        once `busy` is False. (This used to wait for it here, up to the I/O timeout, on the
        scheduler's thread: a prefill paused mid-frame froze every decode for as long, #10.)"""
        self.fail("aborted by the decode scheduler")
