"""Prefill side of PD disaggregation, inside the scheduler process.

GenerateReq -> PrefillBootstrapQueue (admission check; sender bootstrapping: waits
for decode's page indices) -> scheduler.add_request (normal chunked prefill, prefix
cache, max_new_tokens forced to 1) -> after each chunk's forward (on_prefill_chunk): send
the pages that chunk completed, while the next chunk computes -> on_generation_end: send
the remaining pages + metadata -> inflight queue (poll the sender) ->
scheduler.finish_held: pages freed, finished.

Why per chunk and not per layer: a transfer moves whole pages (every layer of a page is one
contiguous block, transfer/base.py), through `send(page_indices)` calls in order, which
every backend already takes; per-layer sends would need a per-layer hook in the model and a
strided, per-layer transfer in each backend. See docs/architecture.md, "Overlapping the KV
transfer with the prefill".
"""

from __future__ import annotations

import logging
import math
import time

from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.endpoints import DisaggQueues, EndpointFactory, ParkedPages, abort_queued, fail, failure_reason
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.base import BaseKVBootstrapServer, BaseKVManager
from pdserve.disagg.transfer.registry import KVClassType, TransferBackend
from pdserve.engine.request import Req
from pdserve.engine.scheduler import Scheduler
from pdserve.messages import PrefillQueueStats

logger = logging.getLogger(__name__)


class PrefillBootstrapQueue:
    """Requests whose KV sender is bootstrapping (decode has not sent its pages yet)."""

    def __init__(
        self,
        scheduler: Scheduler,
        kv_manager: BaseKVManager,
        backend: TransferBackend,
        bootstrap_port: int,
        tp_rank: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.endpoints = EndpointFactory(kv_manager, backend, bootstrap_port, KVClassType.SENDER)
        self.tp_rank = tp_rank
        self.queue: list[Req] = []

    def add(self, req: Req) -> None:
        if not self.scheduler.check_admission(req):
            return
        req.kv_sender = self.endpoints.create(self.scheduler, req, dest_tp_ranks=[self.tp_rank], pp_rank=0)
        if req.kv_sender is None:
            return
        # the prefill pass produces exactly the first token; decode does the rest
        req.sampling.max_new_tokens = 1
        req.bootstrap_start = time.time()
        self.queue.append(req)

    def pop_bootstrapped(self) -> list[Req]:
        """Requests whose decode side has sent its page indices (ready to prefill)."""
        ready, keep = [], []
        page_size = self.scheduler.page_size
        for req in self.queue:
            if req.finished:
                continue
            state = req.kv_sender.poll()
            if state == KVPoll.WaitingForInput:
                req.kv_sender.init(-(-len(req.origin_input_ids) // page_size))
                ready.append(req)
            elif state == KVPoll.Failed:
                fail(self.scheduler, req, failure_reason(req.kv_sender))
            else:
                keep.append(req)
        self.queue = keep
        return ready

    def abort(self, rid: str) -> bool:
        return abort_queued(self.scheduler, self.queue, rid, "kv_sender")


class PrefillDisagg(DisaggQueues):
    """Owns the bootstrap and inflight queues; hooks into the scheduler."""

    def __init__(
        self,
        scheduler: Scheduler,
        kv_manager: BaseKVManager,
        backend: TransferBackend,
        bootstrap_port: int,
        bootstrap_server: BaseKVBootstrapServer | None = None,
        send_per_chunk: bool = True,
    ) -> None:
        """`send_per_chunk=False`: send all the KV after the prompt's last chunk, as before
        #12 (benchmarks/bench_pd_overlap.py compares the two)."""
        super().__init__(kv_manager, bootstrap_server)
        self.scheduler = scheduler
        self.bootstrap_queue = PrefillBootstrapQueue(scheduler, kv_manager, backend, bootstrap_port)
        self.inflight: list[Req] = []
        # ended requests whose pages a transfer worker still reads (a write under way when the
        # sender failed or was aborted): freed once it stops, without holding up the scheduler
        self.parked = ParkedPages(scheduler, lambda req: req.kv_sender)
        scheduler.on_generation_end(self._on_prefill_done)
        if send_per_chunk:
            scheduler.on_prefill_chunk(self._on_chunk_done)

    def add(self, req: Req) -> None:
        self.bootstrap_queue.add(req)

    def has_work(self) -> bool:
        return bool(self.bootstrap_queue.queue or self.inflight or self.parked)

    def _fail(self, req: Req, message: str, status: int = 500) -> None:
        self.parked.fail(req, message, status)

    def _on_chunk_done(self, req: Req) -> None:
        """A prompt chunk's forward ended and more chunks follow: ship the pages it filled
        (wholly below `req.kv_len`; the partly filled last one waits for the next chunk)
        now, so the transfer runs while the next chunk computes."""
        sender = req.kv_sender
        if sender is None:
            return
        if sender.poll() == KVPoll.Failed:  # decode gave up (abort, timeout): stop computing
            self._fail(req, failure_reason(sender))
            return
        self._send(req, req.kv_len // self.scheduler.page_size, None)

    def _on_prefill_done(self, req: Req) -> None:
        """First token sampled: ship the prompt's remaining pages and the metadata record."""
        n_pages = -(-len(req.origin_input_ids) // self.scheduler.page_size)
        lp = req.logprobs[0] if req.logprobs else math.nan
        meta = KVMetadata(
            room=req.bootstrap_room or 0,
            output_token_id=req.output_ids[0],
            output_logprob=lp,
            cached_tokens=req.cached_tokens,
            prompt_tokens=len(req.origin_input_ids),
        )
        if self._send(req, n_pages, meta):
            self.inflight.append(req)

    def _send(self, req: Req, upto: int, meta: KVMetadata | None) -> bool:
        """Hand pages [sent, upto) of the request to its sender (with `meta`: the last call);
        False after failing the request."""
        sent = req.kv_sent_pages
        if meta is None and upto <= sent:
            return True
        req.kv_sent_pages = upto
        if sent and req.num_retractions:
            # never on a prefill server (retraction only makes room for a decoding request,
            # and none decodes here); pages already handed over were freed and recomputed
            self._fail(req, "retracted after part of its KV was sent")
            return False
        try:
            req.kv_sender.send(req.pages[sent:upto], meta)
        except Exception as e:
            self._fail(req, f"KV send failed: {e}")
            return False
        return True

    def step(self) -> None:
        if self.parked:
            self.parked.release()
        for req in self.bootstrap_queue.pop_bootstrapped():
            self.scheduler.add_request(req)
        keep = []
        for req in self.inflight:
            state = req.kv_sender.poll()
            if state == KVPoll.Success:
                req.transfer_end = time.time()
                req.transfer_start = req.first_token_time or req.transfer_end
                self.scheduler.finish_held(req)
            elif state == KVPoll.Failed:
                self._fail(req, failure_reason(req.kv_sender))
            else:
                keep.append(req)
        self.inflight = keep

    def abort(self, rid: str) -> bool:
        if self.bootstrap_queue.abort(rid):  # nothing sent yet
            return True
        for req in self.inflight:
            if req.rid == rid:
                self.inflight.remove(req)
                req.kv_sender.abort()
                self._fail(req, "aborted by the client", 499)  # parks the pages a write reads
                return True
        # waiting for or inside its prefill forward: decode must hear now, not after its
        # waiting timeout; the scheduler frees (and caches) the pages (return False), unless
        # a chunk already handed over is still being written from them
        req = self.scheduler.get(rid)
        if req is not None and not req.finished and req.kv_sender is not None:
            req.kv_sender.abort()
            if req.kv_sender.busy:
                self._fail(req, "aborted by the client", 499)
                return True
        return False

    def stats(self) -> PrefillQueueStats:
        return PrefillQueueStats(
            bootstrap_queue_len=len(self.bootstrap_queue.queue),
            inflight_queue_len=len(self.inflight),
            parked_reqs=len(self.parked),
        )
