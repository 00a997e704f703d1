"""Prefill side of the socket backends (tcp, shm), per request: the sender (its state, its
destinations, the pieces in flight). The per-rank socket service that moves the bytes is in
prefill_service.py.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, NoReturn

from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import WAKER, KVPoll, PollState
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.base import BaseKVSender, KVTransferError, PageIndices, as_page_array, check_room
from pdserve.disagg.transfer.prefill_service import (
    Destination,
    Job,
    PrefillTransferService,
    RoomEntry,
    release_jobs_locked,
)

if TYPE_CHECKING:
    from pdserve.disagg.transfer.socket_manager import SocketKVManager

logger = logging.getLogger(__name__)


class SocketKVSender(BaseKVSender):
    """Prefill-side sender of the tcp and shm backends."""

    def __init__(
        self,
        mgr: "SocketKVManager",
        bootstrap_addr: str,
        bootstrap_room: int,
        dest_tp_ranks: list[int] | None = None,
        pp_rank: int | None = None,
    ) -> None:
        if mgr.mode != DisaggregationMode.PREFILL or mgr.prefill is None:
            raise ValueError("a KV sender needs a manager in prefill mode")
        self.mgr = mgr
        self.svc: PrefillTransferService = mgr.prefill
        self.bootstrap_addr = bootstrap_addr
        self.room = check_room(bootstrap_room)
        self._state = PollState(KVPoll.Bootstrapping)
        self._created = time.monotonic()
        self.num_pages: int | None = None
        self.metadata: KVMetadata | None = None
        # guarded by svc.lock:
        self._dests: list[Destination] = []
        self._queued_pages = 0
        self._final = False
        self._meta_pending = 0
        self._bytes = 0
        self._writing = 0  # pieces being written now (their workers read this request's pages)
        self._t_first_send: float | None = None
        self.svc.attach(self)

    @property
    def done(self) -> bool:
        """Success or Failed: no more work for the transfer service."""
        return self._state.done

    def slice_nbytes(self, dest: Destination) -> int:
        """Bytes of one page's share for `dest`."""
        a = self.mgr.args
        return a.page_nbytes // a.num_kv_heads * (dest.src_heads[1] - dest.src_heads[0])

    # called with svc.lock held
    def update_locked(self, entry: RoomEntry) -> None:
        if self._state.done or entry.required is None or len(entry.dests) < entry.required:
            return
        if self.num_pages is not None:
            for d in entry.dests.values():
                if len(d.pages) != self.num_pages:
                    self.fail(
                        f"decode rank {d.decode_rank} allocated {len(d.pages)} pages, prefill has {self.num_pages}"
                    )
                    return
        self._dests = sorted(entry.dests.values(), key=lambda d: d.decode_rank)
        self._state.advance(KVPoll.WaitingForInput)

    def init(self, num_pages: int) -> None:
        if not (1 <= num_pages <= wire.MAX_PAGES_PER_ROOM):
            raise ValueError(f"num_pages must be in 1..{wire.MAX_PAGES_PER_ROOM}, got {num_pages}")
        with self.svc.lock:
            self.num_pages = num_pages
            bad = [d for d in self._dests if len(d.pages) != num_pages]
        if bad:
            self.fail(f"decode rank {bad[0].decode_rank} allocated {len(bad[0].pages)} pages, prefill has {num_pages}")

    def send(self, page_indices: PageIndices, metadata: KVMetadata | None = None) -> None:
        if self._state.done:
            return  # already failed or aborted: poll() reports it
        if self._state.state == KVPoll.Bootstrapping:
            raise RuntimeError("send() before the sender reached WaitingForInput")
        if self.num_pages is None:
            raise RuntimeError("call init(num_pages) before send()")
        pages = as_page_array(page_indices, self.mgr.args.num_pages)
        if metadata is not None and metadata.room != self.room:
            raise ValueError(f"metadata is for room {metadata.room}, this sender is room {self.room}")
        with self.svc.lock:
            if self._final:
                raise RuntimeError("send() after the final chunk (the one with metadata)")
            offset = self._queued_pages
            if offset + len(pages) > self.num_pages or (metadata is not None and offset + len(pages) != self.num_pages):
                raise ValueError(
                    f"chunk of {len(pages)} pages at offset {offset} does not fit a request of "
                    f"{self.num_pages} pages (the chunk with metadata must be the last one)"
                )
            jobs: list[Job] = []
            for d in self._dests:
                pieces = self.svc.split_pieces(self, d, pages, offset)
                d.outstanding += len(pieces)
                jobs += pieces
            self._queued_pages += len(pages)
            if self._t_first_send is None:
                self._t_first_send = time.monotonic()
            if metadata is not None:
                self.metadata = metadata
                self._final = True
                self._meta_pending = len(self._dests)
                for d in self._dests:
                    if d.outstanding == 0 and not d.meta_queued:
                        d.meta_queued = True
                        jobs.append(Job("meta", self, d))
        self._state.advance(KVPoll.Transferring)
        self.svc.submit(jobs)

    def piece_done(self, dest: Destination, nbytes: int) -> bool:
        """A worker wrote a piece; True when that worker should now send dest's metadata."""
        with self.svc.lock:
            self._bytes += nbytes
            dest.outstanding -= 1
            if self._final and dest.outstanding == 0 and not dest.meta_queued:
                dest.meta_queued = True
                return True
            return False

    def claim_meta(self, dest: Destination) -> bool:
        """A worker is about to send a piece: True when it is dest's last outstanding piece of
        the final chunk, so its META goes out with it (the worker then calls piece_done and
        meta_sent; no META job is queued for dest)."""
        with self.svc.lock:
            if self._final and dest.outstanding == 1 and not dest.meta_queued:
                dest.meta_queued = True
                return True
            return False

    def meta_sent(self, dest: Destination) -> None:
        with self.svc.lock:
            self._meta_pending -= 1
            done = self._meta_pending == 0
        if done and self._state.advance(KVPoll.Success):
            t0 = self._t_first_send or self._created
            self.mgr._stats.record_success(self._bytes, time.monotonic() - t0)
            self.svc.detach(self)

    def begin_write(self, dest: Destination) -> bool:
        """A worker is about to write a piece, reading this request's prefill pages: False
        when the sender already failed (its pages may be freed: nothing more is written)."""
        with self.svc.lock:
            if self._state.state == KVPoll.Failed:
                return False
            dest.writing += 1
            self._writing += 1
            return True

    def end_write(self, dest: Destination) -> None:
        """The piece's write ended (done or not): it reads the prefill pages no more."""
        with self.svc.lock:
            dest.writing -= 1
            self._writing -= 1
            failed = self._state.state == KVPoll.Failed
            jobs = release_jobs_locked(self, [dest], self._state.reason or "failed") if failed else []
        self.svc.submit(jobs)
        if failed and self._writing == 0:
            WAKER.wake()  # the scheduler may free the pages it parked (`busy` turned False)

    @property
    def busy(self) -> bool:
        """A worker still reads this request's prefill pages (a write under way when the sender
        failed or was aborted): they may not be freed or reused yet. It turns False once the
        write ends; no write starts after the sender failed, so it never turns True again."""
        return self._writing > 0

    def fail(self, reason: str, notify_decode: bool = True, detach: bool = True) -> None:
        if not self._state.fail(reason):
            return
        logger.warning("KV sender room %d failed: %s", self.room, reason)
        self.mgr._stats.record_failure()
        with self.svc.lock:
            entry = self.svc._rooms.get(self.room)
            # every decode rank registered so far (not only once all did): each may hold a grant
            dests = list(entry.dests.values()) if entry is not None and entry.sender is self else list(self._dests)
            # decode's standing grants end with an ABORT, sent once no write is under way
            # (a write under way sends it when it ends), whether or not decode is told otherwise
            jobs = release_jobs_locked(self, dests, reason)
            if notify_decode:
                jobs += [Job("abort", self, d, reason=reason) for d in dests if not d.granted]
        if detach:
            self.svc.detach(self)
        self.svc.submit(jobs)

    def poll(self) -> KVPoll:
        state = self._state.state
        if state == KVPoll.Bootstrapping and time.monotonic() - self._created > self.mgr.bootstrap_timeout:
            self.fail(
                f"decode did not send its page indices within {self.mgr.bootstrap_timeout:g}s "
                "(SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT)"
            )
        return self._state.state

    @property
    def failure_reason(self) -> str | None:
        return self._state.reason

    def failure_exception(self) -> NoReturn:
        raise KVTransferError(self.room, self._state.reason or "unknown failure")

    def abort(self) -> None:
        self.fail("aborted by the prefill scheduler")
