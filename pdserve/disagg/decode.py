"""Decode side of PD disaggregation, inside the scheduler process.

GenerateReq -> DecodePreallocQueue (admission check; receiver finds the prefill rank;
scheduler.preallocate reserves pages within a budget that leaves room for running
requests to grow) -> DecodeTransferQueue (pop_ready polls receivers) ->
scheduler.add_prebuilt: the request joins the running batch with the first token
prefill produced and its prompt KV in place; no prompt recomputation.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from pdserve.disagg.endpoints import DisaggQueues, EndpointFactory, ParkedPages, fail, failure_reason
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.base import BaseKVManager
from pdserve.disagg.transfer.registry import KVClassType, TransferBackend
from pdserve.engine.request import Req, ReqStatus
from pdserve.engine.plan import Prealloc
from pdserve.engine.scheduler import Scheduler
from pdserve.messages import DecodeQueueStats

logger = logging.getLogger(__name__)


class DecodePreallocQueue:
    def __init__(
        self, scheduler: Scheduler, kv_manager: BaseKVManager, backend: TransferBackend, bootstrap_port: int
    ) -> None:
        self.scheduler = scheduler
        self.endpoints = EndpointFactory(kv_manager, backend, bootstrap_port, KVClassType.RECEIVER)
        self.queue: list[Req] = []
        self.fail = lambda req, message, status=500: fail(scheduler, req, message, status)

    def add(self, req: Req) -> None:
        if not self.scheduler.check_admission(req):
            return
        req.kv_receiver = self.endpoints.create(self.scheduler, req)
        if req.kv_receiver is None:
            return
        req.bootstrap_start = time.time()
        req.status = ReqStatus.WAITING_FOR_KV
        self.queue.append(req)

    def pop_preallocated(self) -> list[Req]:
        scheduler = self.scheduler
        ready, keep = [], []
        for i, req in enumerate(self.queue):
            if req.finished:
                continue
            state = req.kv_receiver.poll()
            if state == KVPoll.Failed:
                self.fail(req, failure_reason(req.kv_receiver))
                continue
            if state != KVPoll.WaitingForInput:
                keep.append(req)
                continue
            decision = scheduler.preallocate(req, len(req.origin_input_ids) + 1)  # prompt + first token
            if decision == Prealloc.RESUME_FIRST:  # retracted requests resume first
                keep.append(req)
                continue
            if decision == Prealloc.NO_BUDGET:
                keep.extend(r for r in self.queue[i:] if not r.finished)
                break
            n_prompt_pages = -(-len(req.origin_input_ids) // scheduler.page_size)
            req.kv_receiver.init(req.pages[:n_prompt_pages])
            ready.append(req)
        self.queue = keep
        return ready


class DecodeTransferQueue:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.queue: list[Req] = []
        self.transfer_seconds: deque[float] = deque(maxlen=100)  # the recent ones (/metrics' mean)
        self.num_failed = 0
        self.fail = lambda req, message, status=500: fail(scheduler, req, message, status)

    def extend(self, reqs: list[Req]) -> None:
        self.queue.extend(reqs)

    def pop_ready(self) -> list[Req]:
        """Requests whose KV and metadata have arrived."""
        ready, keep = [], []
        for req in self.queue:
            if req.finished:
                continue
            state = req.kv_receiver.poll()
            if state == KVPoll.Success:
                meta = req.kv_receiver.get_metadata()
                if meta is None or (req.bootstrap_room is not None and meta.room != req.bootstrap_room):
                    self.num_failed += 1
                    self.fail(req, f"KV metadata room mismatch for room {req.bootstrap_room}")
                    continue
                now = time.time()
                # the wait covers prefill's forward and the transfer; the receiver times the
                # transfer itself (first byte to Success; backends that move nothing: 0)
                xfer = getattr(req.kv_receiver, "transfer_seconds", None) or 0.0
                req.transfer_end = now
                req.transfer_start = max(req.bootstrap_start, now - xfer)
                self.transfer_seconds.append(req.transfer_time)
                req.output_ids = [int(meta.output_token_id)]
                if req.return_logprob:
                    req.logprobs = [float(meta.output_logprob)]
                    req.top_logprobs = [[]]
                req.cached_tokens = int(meta.cached_tokens)
                req.kv_len = len(req.origin_input_ids)
                req.first_token_time = now
                req.admit_time = req.bootstrap_start
                ready.append(req)
            elif state == KVPoll.Failed:
                self.num_failed += 1
                self.fail(req, failure_reason(req.kv_receiver))
            else:
                keep.append(req)
        self.queue = keep
        return ready


class DecodeDisagg(DisaggQueues):
    def __init__(
        self, scheduler: Scheduler, kv_manager: BaseKVManager, backend: TransferBackend, bootstrap_port: int
    ) -> None:
        super().__init__(kv_manager)
        self.scheduler = scheduler
        self.prealloc_queue = DecodePreallocQueue(scheduler, kv_manager, backend, bootstrap_port)
        self.transfer_queue = DecodeTransferQueue(scheduler)
        self.prealloc_queue.fail = self.transfer_queue.fail = self._fail
        # ended requests whose pages a connection thread still writes into (a prefill paused
        # or slow mid-frame): freed once it stops, without holding up the scheduler
        self.parked = ParkedPages(scheduler, lambda req: req.kv_receiver)

    def add(self, req: Req) -> None:
        self.prealloc_queue.add(req)

    def has_work(self) -> bool:
        return bool(self.prealloc_queue.queue or self.transfer_queue.queue or self.parked)

    def _fail(self, req: Req, message: str, status: int = 500) -> None:
        self.parked.fail(req, message, status)

    def step(self) -> None:
        if self.parked:
            self.parked.release()
        self.transfer_queue.extend(self.prealloc_queue.pop_preallocated())
        for req in self.transfer_queue.pop_ready():
            # prebuilt: join the running batch, decoding from prefill's first token
            self.scheduler.add_prebuilt(req)

    def abort(self, rid: str) -> bool:
        """Client went away while the request waits for its KV: tell prefill, end it."""
        for q in (self.prealloc_queue, self.transfer_queue):
            for req in q.queue:
                if req.rid == rid:
                    q.queue.remove(req)
                    req.kv_receiver.abort()  # returns at once; a write under way parks the pages
                    self._fail(req, "aborted by the client", 499)
                    return True
        return False

    def stats(self) -> DecodeQueueStats:
        kv = self.kv_manager.stats()
        secs = self.transfer_queue.transfer_seconds
        return DecodeQueueStats(
            prealloc_queue_len=len(self.prealloc_queue.queue),
            transfer_queue_len=len(self.transfer_queue.queue),
            parked_reqs=len(self.parked),
            num_failed_transfers=self.transfer_queue.num_failed,
            avg_transfer_latency_s=sum(secs) / len(secs) if secs else 0.0,
            kv_transfers_completed=kv.transfers_completed,
            kv_transfers_failed=kv.transfers_failed,
            kv_bytes_transferred=kv.bytes_transferred,
            kv_transfer_mean_latency_s=kv.mean_latency_s,
            kv_transfer_gbps=kv.gbps,
        )
