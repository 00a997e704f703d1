"""Prefill side of PD disaggregation, inside the scheduler process.

    GenerateReq -> PrefillBootstrapQueue (sender bootstrapping: waits for decode's
    page indices) -> scheduler.waiting (normal chunked prefill, prefix cache,
    max_new_tokens forced to 1) -> finish_hook: send the pages + metadata ->
    inflight queue (poll the sender) -> pages freed, request finished.
"""

from __future__ import annotations

import logging
import math
import time
from http import HTTPStatus

from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.base import BaseKVManager
from pdserve.disagg.transfer.registry import (FAKE_BOOTSTRAP_HOST, KVClassType, TransferBackend,
                                              get_kv_class, is_fake_bootstrap)
from pdserve.engine.request import Req, ReqStatus
from pdserve.engine.scheduler import Scheduler
from pdserve.messages import FinishReason

logger = logging.getLogger(__name__)


def fail(scheduler: Scheduler, req: Req, message: str, status: int = 500) -> None:
    """End a PD request with an error: free its pages, tell the client."""
    logger.error("request %s failed: %s", req.rid, message)
    if req in scheduler.running:
        scheduler.running.remove(req)
    scheduler.release(req, cache_it=False)
    scheduler.finish(req, FinishReason("abort", message=message, status_code=status))


class PrefillBootstrapQueue:
    """Requests whose KV sender is bootstrapping (decode has not sent its pages yet)."""

    def __init__(self, scheduler: Scheduler, kv_manager: BaseKVManager, backend: TransferBackend,
                 bootstrap_port: int, max_total_num_tokens: int, tp_rank: int = 0) -> None:
        self.scheduler = scheduler
        self.kv_manager = kv_manager
        self.backend = backend
        self.bootstrap_port = bootstrap_port
        self.max_total_num_tokens = max_total_num_tokens
        self.tp_rank = tp_rank
        self.queue: list[Req] = []
        self._fake_mgr: BaseKVManager | None = None

    def add(self, req: Req) -> None:
        if self._exceeds_kv_capacity(req):
            return
        host = req.bootstrap_host or FAKE_BOOTSTRAP_HOST
        backend = TransferBackend.FAKE if is_fake_bootstrap(host) else self.backend
        mgr = self.kv_manager if backend == self.backend else self._fake_manager()
        sender_cls = get_kv_class(backend, KVClassType.SENDER)
        room = req.bootstrap_room if req.bootstrap_room is not None else 0
        try:
            req.kv_sender = sender_cls(mgr, f"{host}:{req.bootstrap_port or self.bootstrap_port}", room,
                                       dest_tp_ranks=[self.tp_rank], pp_rank=0)
        except Exception as e:  # bad room / address: the client gets a 400
            self.scheduler.finish(req, FinishReason("abort", message=f"bad bootstrap info: {e}",
                                                    status_code=HTTPStatus.BAD_REQUEST))
            return
        # the prefill pass produces exactly the first token; decode does the rest
        req.sampling.max_new_tokens = 1
        req.bootstrap_start = time.time()
        self.scheduler.reqs[req.rid] = req
        self.queue.append(req)

    def extend(self, reqs: list[Req]) -> None:
        for r in reqs:
            self.add(r)

    def _fake_manager(self) -> BaseKVManager:
        if self._fake_mgr is None:
            cls = get_kv_class(TransferBackend.FAKE, KVClassType.MANAGER)
            self._fake_mgr = cls(self.kv_manager.args, self.kv_manager.mode)
        return self._fake_mgr

    def _exceeds_kv_capacity(self, req: Req) -> bool:
        n = len(req.origin_input_ids)
        if n + 1 > self.max_total_num_tokens:
            self.scheduler.finish(req, FinishReason(
                "abort", status_code=HTTPStatus.BAD_REQUEST,
                message=f"Request {req.rid} exceeds the maximum number of tokens: {n} > "
                        f"{self.max_total_num_tokens - 1}"))
            return True
        return False

    def pop_bootstrapped(self) -> list[Req]:
        """Requests whose decode side has sent its page indices (ready to prefill)."""
        ready, keep = [], []
        ps = self.scheduler.ps
        for req in self.queue:
            if req.finished:
                continue
            state = req.kv_sender.poll()
            if state == KVPoll.WaitingForInput:
                req.kv_sender.init(-(-len(req.origin_input_ids) // ps))
                ready.append(req)
            elif state == KVPoll.Failed:
                fail(self.scheduler, req, _reason(req.kv_sender))
            else:
                keep.append(req)
        self.queue = keep
        return ready

    def abort(self, rid: str) -> bool:
        for req in self.queue:
            if req.rid == rid:
                self.queue.remove(req)
                req.kv_sender.abort()
                fail(self.scheduler, req, "aborted by the client", 499)
                return True
        return False


def _reason(endpoint) -> str:
    try:
        endpoint.failure_exception()
    except Exception as e:  # the backends raise KVTransferError with the reason
        return str(e)
    return "KV transfer failed"


class PrefillDisagg:
    """Owns the bootstrap and inflight queues; hooks into the scheduler."""

    def __init__(self, scheduler: Scheduler, kv_manager: BaseKVManager, backend: TransferBackend,
                 bootstrap_port: int) -> None:
        self.scheduler = scheduler
        self.kv_manager = kv_manager
        self.bootstrap_queue = PrefillBootstrapQueue(scheduler, kv_manager, backend, bootstrap_port,
                                                     scheduler.alloc.capacity_tokens)
        self.inflight: list[Req] = []
        scheduler.finish_hook = self._on_prefill_done

    def add(self, req: Req) -> None:
        self.bootstrap_queue.add(req)

    @property
    def has_work(self) -> bool:
        return bool(self.bootstrap_queue.queue or self.inflight)

    def _on_prefill_done(self, req: Req, reason: FinishReason) -> bool:
        """First token sampled: ship the prompt's pages and the metadata record."""
        n_pages = -(-len(req.origin_input_ids) // self.scheduler.ps)
        lp = req.logprobs[0] if req.logprobs else math.nan
        meta = KVMetadata(room=req.bootstrap_room or 0, output_token_id=req.output_ids[0], output_logprob=lp,
                          cached_tokens=req.cached_tokens, prompt_tokens=len(req.origin_input_ids))
        try:
            req.kv_sender.send(req.pages[:n_pages], meta)
        except Exception as e:
            fail(self.scheduler, req, f"KV send failed: {e}")
            return True
        req.pending_finish = reason
        req.status = ReqStatus.WAITING_FOR_KV
        self.inflight.append(req)
        return True

    def step(self) -> None:
        for req in self.bootstrap_queue.pop_bootstrapped():
            self.scheduler.waiting.append(req)
        keep = []
        for req in self.inflight:
            state = req.kv_sender.poll()
            if state == KVPoll.Success:
                req.transfer_time = time.time() - (req.first_token_time or time.time())
                self.scheduler.release(req)
                self.scheduler.finish(req, req.pending_finish)
            elif state == KVPoll.Failed:
                fail(self.scheduler, req, _reason(req.kv_sender))
            else:
                keep.append(req)
        self.inflight = keep

    def abort(self, rid: str) -> bool:
        if self.bootstrap_queue.abort(rid):
            return True
        for req in self.inflight:
            if req.rid == rid:
                self.inflight.remove(req)
                req.kv_sender.abort()
                fail(self.scheduler, req, "aborted by the client", 499)
                return True
        # waiting for or inside its prefill forward: the scheduler frees the pages (return
        # False), but decode must hear now, not after its waiting timeout
        req = self.scheduler.reqs.get(rid)
        if req is not None and not req.finished and req.kv_sender is not None:
            req.kv_sender.abort()
        return False

    def stats(self) -> dict:
        return {"bootstrap_queue_len": len(self.bootstrap_queue.queue), "inflight_queue_len": len(self.inflight)}
