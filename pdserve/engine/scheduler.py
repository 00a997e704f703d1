"""Continuous-batching scheduler: policy only, no tensor math.

One engine step is three calls:
    plan = scheduler.schedule()      # which tokens of which requests run
    out = runner.run(plan)           # tensors: forward + sampling
    outs = scheduler.update(plan, out)

A batch holds decode tokens (one per running request) and prefill chunks under a
token budget (`chunked_prefill_size`). When a decode cannot get a KV page, the
prefix cache is evicted first, then the most recently admitted requests are
retracted (their KV goes to the prefix cache) and resumed later: never failed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.radix_cache import NoCache, RadixCache
from pdserve.engine.request import Req, ReqStatus
from pdserve.messages import FinishReason, ReqOut

logger = logging.getLogger(__name__)


@dataclass
class ScheduledItem:
    req: Req
    start: int  # position (in fill_ids) of the first token computed
    n: int  # tokens computed
    sample: bool  # the chunk reaches the end of fill_ids: sample the next token


@dataclass
class Plan:
    items: list[ScheduledItem]  # decode items first (num_decode of them), then extends
    num_decode: int

    @property
    def num_tokens(self) -> int:
        return sum(i.n for i in self.items)


@dataclass
class RunOutput:
    next_ids: list[int]  # one per sampled item, in plan order
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # plan item index -> logprob of each next *input* token of that chunk (return_logprob)
    input_logprobs: dict[int, list[float]] | None = None


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_retractions: int = 0
    finished: int = 0
    aborted: int = 0
    steps: int = 0
    extra: dict = field(default_factory=dict)


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, max_running_requests: int,
                 chunked_prefill_size: int, context_length: int, eos_ids: tuple[int, ...],
                 disable_radix_cache: bool = False,
                 detokenize: Callable[[list[int]], str] | None = None) -> None:
        self.alloc = allocator
        self.ps = allocator.page_size
        self.cache: RadixCache = NoCache(allocator) if disable_radix_cache else RadixCache(allocator)
        self.max_running = max_running_requests
        self.chunk = chunked_prefill_size
        self.context_length = context_length
        self.eos_ids = set(eos_ids)
        self.detokenize = detokenize
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admission order
        self.reqs: dict[str, Req] = {}
        self.pending_outs: list[ReqOut] = []  # finished outside update (aborts, rejects)
        self.stats = SchedulerStats()
        # PD prefill: called when a request's generation ends; returning True means the
        # disaggregation layer keeps the request (and its pages) until its KV is sent.
        self.finish_hook: Callable[[Req, FinishReason], bool] | None = None

    # ---- intake -------------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        if req.rid in self.reqs:
            self.finish(req, FinishReason("abort", message=f"duplicate request id {req.rid!r}", status_code=400))
            return
        need = len(req.origin_input_ids) + 1
        if need > self.alloc.capacity_tokens:
            self.finish(req, FinishReason(
                "abort", status_code=400,
                message=f"prompt of {len(req.origin_input_ids)} tokens does not fit the KV pool "
                        f"({self.alloc.capacity_tokens} tokens)"))
            return
        if len(req.origin_input_ids) >= self.context_length:
            self.finish(req, FinishReason(
                "abort", status_code=400,
                message=f"prompt of {len(req.origin_input_ids)} tokens exceeds the context length "
                        f"({self.context_length})"))
            return
        if req.sampling.max_new_tokens == 0:
            self.finish(req, FinishReason("length", matched=None))
            return
        self.reqs[req.rid] = req
        self.waiting.append(req)

    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        req = self.reqs.get(rid)
        if req is None or req.finished:
            return
        if req.status == ReqStatus.WAITING:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        self.release(req)
        self.finish(req, FinishReason("abort", message=message))

    # ---- schedule -----------------------------------------------------------------------
    def schedule(self) -> Plan | None:
        decode: list[ScheduledItem] = []
        for req in list(self.running):
            if not req.is_decoding or req not in self.running:
                continue
            if self._ensure_pages(req, req.kv_len + 1, protect=req):
                decode.append(ScheduledItem(req, req.kv_len, 1, True))
        decode = [d for d in decode if d.req in self.running]
        extend: list[ScheduledItem] = []
        budget = self.chunk
        # chunked prefills already running come first, then new requests (FIFO)
        for req in self.running:
            if budget <= 0:
                break
            if req.is_decoding:
                continue
            item = self._prefill_item(req, budget)
            if item is None:
                break
            extend.append(item)
            budget -= item.n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            self._admit(req)
            item = self._prefill_item(req, budget)
            if item is None:
                self.release(req, cache_it=False)
                break
            self.waiting.popleft()
            req.status = ReqStatus.RUNNING
            req.admit_time = req.admit_time or time.time()
            self.running.append(req)
            extend.append(item)
            budget -= item.n
        if not decode and not extend:
            return None
        self.stats.steps += 1
        return Plan(decode + extend, len(decode))

    def _admit(self, req: Req) -> None:
        # input-token logprobs need every prompt position computed: no prefix reuse then
        want_input_lp = req.return_logprob and req.num_retractions == 0
        pages, node = self.cache.match_prefix([] if want_input_lp else req.fill_ids[: req.fill_len - 1])
        self.cache.inc_lock(node)
        req.prefix_node = node
        req.pages = list(pages)
        req.kv_len = req.prefix_len = len(pages) * self.ps
        if req.num_retractions == 0:
            req.cached_tokens = req.prefix_len

    def _prefill_item(self, req: Req, budget: int) -> ScheduledItem | None:
        n = min(req.fill_len - req.kv_len, budget)
        # keep one free page per running decode so admissions do not force retractions
        reserve = sum(1 for r in self.running if r.is_decoding and r is not req)
        if not self._ensure_pages(req, req.kv_len + n, reserve=reserve):
            return None
        return ScheduledItem(req, req.kv_len, n, req.kv_len + n == req.fill_len)

    def _ensure_pages(self, req: Req, num_tokens: int, reserve: int = 0, protect: Req | None = None) -> bool:
        """Grow req.pages to hold num_tokens; evict cache, then (decode only) retract."""
        need = self.alloc.pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        while True:
            short = need + reserve - self.alloc.num_free
            if short > 0 and self.cache.evictable_pages:
                self.cache.evict(short)
            if self.alloc.num_free >= need + reserve:
                req.pages.extend(self.alloc.alloc(need))
                return True
            if protect is None:
                return False
            victim = self._pick_victim(protect)
            if victim is None:
                # alone and still no room: the pool cannot hold this request any longer
                self.running.remove(req)
                self.release(req)
                self.finish(req, FinishReason(
                    "length", message="KV pool exhausted: the request no longer fits the pool"))
                return False
            self._retract(victim)

    def _pick_victim(self, protect: Req) -> Req | None:
        for r in reversed(self.running):
            if r is not protect:
                return r
        return None

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        self.release(req)
        req.status = ReqStatus.WAITING
        req.num_retractions += 1
        self.stats.num_retractions += 1
        self.waiting.appendleft(req)
        logger.info("retracted %s to free KV pages", req.rid)

    # ---- update -------------------------------------------------------------------------
    def update(self, plan: Plan, out: RunOutput) -> list[ReqOut]:
        now = time.time()
        k = 0
        touched: list[Req] = []
        for idx, item in enumerate(plan.items):
            req = item.req
            if out.input_logprobs and idx in out.input_logprobs:
                req.input_logprobs.extend(out.input_logprobs[idx])
            if req.finished:  # aborted while running
                if item.sample:
                    k += 1
                continue
            req.kv_len = item.start + item.n
            if item.start == req.prefix_len and req.num_retractions == 0 and not req.output_ids:
                self.stats.prompt_tokens += len(req.origin_input_ids)
            if not item.sample:
                continue
            tok = out.next_ids[k]
            if out.logprobs is not None and req.return_logprob:
                req.logprobs.append(out.logprobs[k])
                req.top_logprobs.append(out.top_logprobs[k] if out.top_logprobs else [])
            k += 1
            if req.first_token_time is None:
                req.first_token_time = now
            req.output_ids.append(tok)
            self.stats.generation_tokens += 1
            if req.sampling.has_penalty:
                req.token_counts[tok] = req.token_counts.get(tok, 0) + 1
            touched.append(req)
            reason = self.check_finish(req, tok)
            if reason is not None:
                self.running.remove(req)
                if self.finish_hook is not None and self.finish_hook(req, reason):
                    continue
                self.release(req)
                self.finish(req, reason, emit=False)
        # outputs produced between steps (PD first tokens, aborts) go first: they are older
        outs = self.pending_outs + [self.make_out(r) for r in touched]
        self.pending_outs = []
        return outs

    def check_finish(self, req: Req, tok: int) -> FinishReason | None:
        sp = req.sampling
        if req.grammar is not None:  # advance the matcher over the new output token(s)
            if not req.grammar.sync(req.output_ids):
                return FinishReason("abort", status_code=500,
                                    message=f"token {tok} is not allowed by the request's grammar")
            if req.grammar.terminated:
                return FinishReason("stop", matched=tok if tok in self.eos_ids else None)
        if not sp.ignore_eos and tok in self.eos_ids:
            return FinishReason("stop", matched=tok)
        if tok in sp.stop_token_ids:
            return FinishReason("stop", matched=tok)
        if len(req.output_ids) >= sp.max_new_tokens:
            return FinishReason("length", matched=None)
        if req.fill_len >= self.context_length:
            return FinishReason("length", message="context length reached")
        if sp.stop and self.detokenize is not None:
            longest = max(len(s) for s in sp.stop)
            tail = self.detokenize(req.output_ids[-(longest + 8):])
            for s in sp.stop:
                if s in tail:
                    return FinishReason("stop", matched=s)
        return None

    # ---- release and output -------------------------------------------------------------
    def release(self, req: Req, cache_it: bool = True) -> None:
        """Give the request's pages back: full computed pages to the prefix cache,
        the rest to the allocator; unlock its cached prefix."""
        if req.prefix_node is None and not req.pages:
            return
        aligned = req.kv_len // self.ps * self.ps
        if cache_it:
            dup = self.cache.insert(req.fill_ids[:aligned], req.pages[: aligned // self.ps])
        else:
            dup = aligned
        own = req.prefix_len // self.ps
        self.alloc.free(req.pages[own: dup // self.ps] + req.pages[aligned // self.ps:])
        if req.prefix_node is not None:
            self.cache.dec_lock(req.prefix_node)
        req.pages, req.prefix_node, req.prefix_len, req.kv_len = [], None, 0, 0

    def finish(self, req: Req, reason: FinishReason, emit: bool = True) -> None:
        req.finish = reason
        req.status = ReqStatus.FINISHED
        req.finish_time = time.time()
        self.reqs.pop(req.rid, None)
        if reason.type == "abort":
            self.stats.aborted += 1
        else:
            self.stats.finished += 1
        if emit:
            self.pending_outs.append(self.make_out(req))

    def make_out(self, req: Req) -> ReqOut:
        new = req.output_ids[req.sent_len:]
        lps = req.logprobs[req.sent_len:] if req.return_logprob else None
        tops = req.top_logprobs[req.sent_len:] if req.return_logprob and req.top_logprobs_num else None
        req.sent_len = len(req.output_ids)
        out = ReqOut(req.rid, new, lps, tops, req.finish, len(req.origin_input_ids),
                     req.cached_tokens, len(req.output_ids))
        if req.return_logprob and not req.input_logprobs_sent and len(req.input_logprobs) >= \
                len(req.origin_input_ids) - 1:
            out.input_logprobs = [None] + req.input_logprobs[: len(req.origin_input_ids) - 1]
            req.input_logprobs_sent = True
        if req.finish is not None:
            start = req.admit_time or req.finish_time
            first = req.first_token_time or req.finish_time
            out.queue_time = start - req.arrival_time
            # the part of the transfer before the first token (PD decode) is not prefill
            xfer = req.transfer_time
            inside = 0.0 if xfer is None else max(0.0, min(first, req.transfer_end) - max(start, req.transfer_start))
            out.prefill_time = first - start - inside
            out.transfer_time = xfer
            out.decode_time = req.finish_time - first
        return out

    # ---- introspection ------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def used_pages(self) -> int:
        """Pages not free and not merely cached (held by requests)."""
        return self.alloc.num_pages - self.alloc.num_free - self.cache.evictable_pages

    def flush_cache(self) -> bool:
        if self.running or self.waiting:
            return False
        self.cache.reset()
        return True

    def load(self) -> dict:
        return {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "num_tokens": sum(r.kv_len for r in self.running),
            "num_used_pages": self.used_pages(),
            "num_free_pages": self.alloc.num_free,
            "num_cached_pages": self.cache.evictable_pages,
            "num_total_pages": self.alloc.num_pages,
        }
