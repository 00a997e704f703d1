"""Continuous-batching scheduler: policy only, no tensor math.

One engine step is three calls (`Scheduler.step(runner.run)` makes them):
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
from typing import Callable

from pdserve.engine.admission import kv_pool_fit_error
from pdserve.engine.kv_connector import BaseKVConnector, NoKVConnector
from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.plan import Plan, Prealloc, RunOutput, ScheduledItem, SchedulerStats
from pdserve.engine.prefix_cache import BasePrefixCache
from pdserve.engine.prefix_caches import create_prefix_cache
from pdserve.engine.request import Req, ReqStatus
from pdserve.engine.stop_rules import StopRules
from pdserve.enums import PrefixCacheKind
from pdserve.messages import FinishReason, FinishReasonType, ReqOut, SchedulerLoad

logger = logging.getLogger(__name__)


class Scheduler:
    """The scheduler contract. Warm-up, the event loops, the PD queues and the tests use
    only these methods; the queues and the KV pool behind them are private.

    intake      check_admission(req), add_request(req), preallocate(req, n), add_prebuilt(req);
                a KV connector (`--kv-store`) looks each prompt up on arrival, loads what it
                found on admission and saves the prompt's pages after its prefill
    ending      abort(rid), fail(req, reason), free_pages(req), finish_held(req),
                detach_held(req), on_generation_end(hook), on_prefill_chunk(hook)
    stepping    step(run) -> outputs; or schedule() -> Plan, update(plan, out) -> outputs,
                take_outputs() (the overlap loop runs the forward in between)
    state       has_work(), has_outputs(), get(rid), load(), table_sizes(), flush_cache(),
                reset_stats(), page_size, capacity_tokens
    """

    def __init__(
        self,
        allocator: PageAllocator,
        *,
        max_running_requests: int,
        chunked_prefill_size: int,
        context_length: int,
        eos_ids: tuple[int, ...],
        disable_radix_cache: bool = False,
        detokenize: Callable[[list[int]], str] | None = None,
        kv_connector: BaseKVConnector | None = None,
    ) -> None:
        self._alloc = allocator
        self.page_size = allocator.page_size
        self._cache: BasePrefixCache = create_prefix_cache(
            PrefixCacheKind.NONE if disable_radix_cache else PrefixCacheKind.RADIX, allocator
        )
        self._max_running = max_running_requests
        self._chunk_size = chunked_prefill_size
        self._context_length = context_length
        self._eos_ids = set(eos_ids)
        self._stop = StopRules(self._eos_ids, context_length, detokenize)
        self._waiting: deque[Req] = deque()
        self._running: list[Req] = []  # admission order
        self._reqs: dict[str, Req] = {}  # waiting and running requests by rid
        self._outputs: list[ReqOut] = []  # produced between steps (aborts, rejects, PD)
        self._stats = SchedulerStats()
        self._on_generation_end: Callable[[Req], None] | None = None
        self._on_prefill_chunk: Callable[[Req], None] | None = None
        self._kv: BaseKVConnector = kv_connector or NoKVConnector()

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole KV pool holds."""
        return self._alloc.capacity_tokens

    # ---- intake -------------------------------------------------------------------------
    def check_admission(self, req: Req) -> bool:
        """The admission check of every request (plain, PD prefill, PD decode): True if it
        may run; otherwise it is finished with a 400 that says why, and False."""
        n = len(req.origin_input_ids)
        if req.rid in self._reqs:
            message = f"duplicate request id {req.rid!r}"
        elif (message := kv_pool_fit_error(n, self._alloc.capacity_tokens)) is not None:
            pass
        elif n >= self._context_length:
            message = f"prompt of {n} tokens exceeds the context length ({self._context_length})"
        else:
            return True
        self.fail(req, FinishReason(FinishReasonType.ABORT, message=message, status_code=400))
        return False

    def add_request(self, req: Req) -> None:
        """Queue a request for prefill (FIFO), after the admission check."""
        if not self.check_admission(req):
            return
        if req.sampling.max_new_tokens == 0:
            self._finish(req, FinishReason(FinishReasonType.LENGTH, matched=None))
            return
        req.status = ReqStatus.WAITING
        self._reqs[req.rid] = req
        self._waiting.append(req)
        if not req.wants_input_logprobs:  # KV store lookup beyond the local prefix cache
            n = req.fill_len - 1  # the last prompt token is always computed (it samples)
            local = self._cache.cached_len(req.fill_ids[:n]) // self.page_size
            req.kv_fetch = self._kv.prefetch(req.fill_ids, local, n // self.page_size)

    def preallocate(self, req: Req, num_tokens: int) -> Prealloc:
        """PD decode: reserve pages for `num_tokens` tokens of a request whose KV will be
        written by a transfer, within a budget that leaves every queued request room to
        grow by one page (retraction covers the rest)."""
        if self._waiting:
            return Prealloc.RESUME_FIRST
        need = self._alloc.pages_for(num_tokens)
        reserve = len(self._running) + len(self._waiting)
        if need > self._alloc.num_free + self._cache.evictable_pages - reserve:
            return Prealloc.NO_BUDGET
        short = need - self._alloc.num_free
        if short > 0:
            self._cache.evict(short)
        req.pages = self._alloc.alloc(need)
        return Prealloc.OK

    def add_prebuilt(self, req: Req) -> None:
        """PD decode: a request whose prompt KV is in `req.pages` (kv_len set) and whose
        first token (sampled by prefill) is `req.output_ids[0]` joins the running batch;
        its first output goes out with the next step's."""
        req.status = ReqStatus.RUNNING
        reason = self._stop.check(req, req.output_ids[0])
        self._stats.generation_tokens += 1
        if reason is not None:
            self._release(req)
            self._finish(req, reason)  # emits the token and the finish together
            return
        self._reqs[req.rid] = req
        self._running.append(req)
        self._outputs.append(req.take_out())

    # ---- ending -------------------------------------------------------------------------
    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        """The client went away: end a waiting or running request; its KV is cached."""
        req = self._reqs.get(rid)
        if req is None or req.finished:
            return
        if req.status == ReqStatus.WAITING:
            self._waiting.remove(req)
        elif req in self._running:
            self._running.remove(req)
        self._release(req)
        self._finish(req, FinishReason(FinishReasonType.ABORT, message=message))

    def fail(self, req: Req, reason: FinishReason, keep_pages: bool = False) -> None:
        """End `req` now with `reason`, wherever it is (not added yet, waiting, running, or
        held by the PD layer): its pages are freed, not cached; the client gets `reason`.
        `keep_pages`: they stay allocated until `free_pages(req)` (PD decode: a KV write
        into them is still under way)."""
        if req.finished:
            return
        if req in self._running:
            self._running.remove(req)
        elif req.status == ReqStatus.WAITING and req in self._waiting:
            self._waiting.remove(req)
        if not keep_pages:
            self._release(req, cache_it=False)
        self._finish(req, reason)

    def free_pages(self, req: Req) -> None:
        """Free the pages of a request ended with `fail(..., keep_pages=True)` (not cached)."""
        self._release(req, cache_it=False)

    def on_generation_end(self, hook: Callable[[Req], None]) -> None:
        """PD prefill: when a request's generation ends, hand it to `hook` in status
        SENDING_KV with its pages held; it ends later with `finish_held` or `fail`."""
        self._on_generation_end = hook

    def on_prefill_chunk(self, hook: Callable[[Req], None]) -> None:
        """PD prefill: after the forward of each prompt chunk that does not end the prompt,
        `hook(req)` with `req.kv_len` covering the tokens whose KV is now written (pages
        wholly below it are final: later chunks write only at and after `kv_len`). The
        hook may `fail` the request. Runs inside `update`, before the next `schedule`."""
        self._on_prefill_chunk = hook

    def detach_held(self, req: Req) -> None:
        """A held request leaves this scheduler with its pages, unreleased and unfinished
        (Semi-PD: the decode scheduler, sharing the page allocator, continues it in place
        with `add_prebuilt`). Nothing is sent for it."""
        if req.status != ReqStatus.SENDING_KV:
            raise RuntimeError(f"{req.rid} is not held (status {req.status.name})")
        self._reqs.pop(req.rid, None)

    def finish_held(self, req: Req) -> None:
        """A request held after its generation (PD prefill: the KV is sent) finishes with
        the reason its generation ended with."""
        self._release(req)
        self._finish(req, req.finish_reason)

    # ---- stepping -----------------------------------------------------------------------
    def step(self, run: Callable[[Plan], RunOutput]) -> list[ReqOut]:
        """One engine step: schedule, `run` the plan (the model runner), update. Returns
        the outputs to send, those produced between steps first."""
        plan = self.schedule()
        if plan is None:
            return self.take_outputs()
        return self.update(plan, run(plan))

    def take_outputs(self) -> list[ReqOut]:
        """Outputs produced outside a step (aborts, rejections, PD first tokens)."""
        outs, self._outputs = self._outputs, []
        return outs

    def schedule(self, token_budget: int | None = None) -> Plan | None:
        """The next step's plan. `token_budget` (>= 1) caps this step's prefill tokens below
        `chunked_prefill_size` (Semi-PD bounds how long a prefill forward may hold decode
        back); None: the chunked-prefill size."""
        decode: list[ScheduledItem] = []
        for req in list(self._running):
            if not req.is_decoding or req not in self._running:
                continue
            if self._ensure_pages(req, req.kv_len + 1, protect=req):
                decode.append(ScheduledItem(req, req.kv_len, 1, True))
        decode = [d for d in decode if d.req in self._running]
        extend: list[ScheduledItem] = []
        budget = self._chunk_size if token_budget is None else max(1, min(self._chunk_size, token_budget))
        # chunked prefills already running come first, then new requests (FIFO)
        for req in self._running:
            if budget <= 0:
                break
            if req.is_decoding:
                continue
            item = self._prefill_item(req, budget)
            if item is None:
                break
            extend.append(item)
            budget -= item.n
        stalled = None  # the next request's KV store lookup is still under way (FIFO: wait)
        while self._waiting and budget > 0 and len(self._running) < self._max_running:
            req = self._waiting[0]
            if req.kv_fetch is not None and not self._kv.ready(req.kv_fetch):
                stalled = req.kv_fetch
                break
            self._admit(req)
            item = self._prefill_item(req, budget)
            if item is None:
                self._release(req)  # pages loaded from the store stay, in the prefix cache
                break
            self._waiting.popleft()
            req.status = ReqStatus.RUNNING
            req.admit_time = req.admit_time or time.time()
            self._running.append(req)
            extend.append(item)
            budget -= item.n
        if not decode and not extend:
            if stalled is not None:  # nothing else to run: sleep a little, not spin
                self._kv.wait(stalled, 0.005)
            return None
        self._stats.steps += 1
        self._stats.prefill_computed_tokens += sum(i.n for i in extend)
        return Plan(decode + extend, len(decode))

    def _admit(self, req: Req) -> None:
        # input-token logprobs need every prompt position computed: no prefix reuse then
        pages, node = self._cache.match_prefix([] if req.wants_input_logprobs else req.fill_ids[: req.fill_len - 1])
        self._cache.inc_lock(node)
        req.prefix_node = node
        req.pages = list(pages)
        req.kv_len = req.prefix_len = len(pages) * self.page_size
        fetch, req.kv_fetch = req.kv_fetch, None
        if fetch is not None:
            req.store_pages = self._kv.stored_pages(fetch)
            self._load_from_store(req, fetch)
        req.prefill_start = req.kv_len
        if req.num_retractions == 0:
            req.cached_tokens = req.kv_len

    def _load_from_store(self, req: Req, fetch) -> None:
        """Pages the KV store lookup found beyond the local prefix go into fresh pages of
        the request (owned, like computed ones), as many as fit without forcing a retraction."""
        first = len(req.pages)
        n = self._kv.loadable(fetch, first)
        if n <= 0:
            return
        reserve = sum(1 for r in self._running if r.is_decoding)
        short = n + reserve - self._alloc.num_free
        if short > 0 and self._cache.evictable_pages:
            self._cache.evict(short)
        n = min(n, self._alloc.num_free - reserve)
        if n <= 0:
            return
        pages = self._alloc.alloc(n)
        self._kv.load(fetch, first, pages)
        req.pages.extend(pages)
        req.kv_len += n * self.page_size

    def _prefill_item(self, req: Req, budget: int) -> ScheduledItem | None:
        n = min(req.fill_len - req.kv_len, budget)
        # keep one free page per running decode so admissions do not force retractions
        reserve = sum(1 for r in self._running if r.is_decoding and r is not req)
        if not self._ensure_pages(req, req.kv_len + n, reserve=reserve):
            return None
        start = req.kv_len
        num_input_logprobs = 0
        if req.wants_input_logprobs:
            num_input_logprobs = max(0, min(start + n, len(req.origin_input_ids) - 1) - start)
        return ScheduledItem(req, start, n, start + n == req.fill_len, num_input_logprobs)

    def _ensure_pages(self, req: Req, num_tokens: int, reserve: int = 0, protect: Req | None = None) -> bool:
        """Grow req.pages to hold num_tokens; evict cache, then (decode only) retract."""
        need = self._alloc.pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        while True:
            short = need + reserve - self._alloc.num_free
            if short > 0 and self._cache.evictable_pages:
                self._cache.evict(short)
            if self._alloc.num_free >= need + reserve:
                req.pages.extend(self._alloc.alloc(need))
                return True
            if protect is None:
                return False
            victim = self._pick_victim(protect)
            if victim is None:
                # alone and still no room: the pool cannot hold this request any longer
                self._running.remove(req)
                self._release(req)
                self._finish(
                    req,
                    FinishReason(
                        FinishReasonType.LENGTH, message="KV pool exhausted: the request no longer fits the pool"
                    ),
                )
                return False
            self._retract(victim)

    def _pick_victim(self, protect: Req) -> Req | None:
        for r in reversed(self._running):
            if r is not protect:
                return r
        return None

    def _retract(self, req: Req) -> None:
        self._running.remove(req)
        self._release(req)
        req.status = ReqStatus.WAITING
        req.num_retractions += 1
        self._stats.num_retractions += 1
        self._waiting.appendleft(req)
        logger.info("retracted %s to free KV pages", req.rid)

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
            if item.start == req.prefill_start and req.num_retractions == 0 and not req.output_ids:
                self._stats.prompt_tokens += len(req.origin_input_ids)
            if not item.sample:
                if self._on_prefill_chunk is not None:
                    self._on_prefill_chunk(req)  # PD prefill: ship the chunk's full pages
                continue
            if idx >= plan.num_decode and not req.output_ids and req.num_retractions == 0:
                # the prompt's prefill ended: its full pages the store lacks are written
                self._kv.save(req.origin_input_ids, req.pages, req.store_pages)
            tok = out.next_ids[k]
            if out.logprobs is not None and req.return_logprob:
                req.logprobs.append(out.logprobs[k])
                req.top_logprobs.append(out.top_logprobs[k] if out.top_logprobs else [])
            k += 1
            if req.first_token_time is None:
                req.first_token_time = now
            req.output_ids.append(tok)
            self._stats.generation_tokens += 1
            if req.sampling.has_penalty:
                req.token_counts[tok] = req.token_counts.get(tok, 0) + 1
            touched.append(req)
            reason = self._stop.check(req, tok)
            if reason is not None:
                self._running.remove(req)
                if self._on_generation_end is not None:
                    req.status, req.finish_reason = ReqStatus.SENDING_KV, reason
                    self._on_generation_end(req)  # the PD layer holds it (pages included)
                    continue
                self._release(req)
                self._finish(req, reason, emit=False)
        # outputs produced between steps (PD first tokens, aborts) go first: they are older
        return self.take_outputs() + [r.take_out() for r in touched]

    # ---- release and output -------------------------------------------------------------
    def _release(self, req: Req, cache_it: bool = True) -> None:
        """Give the request's pages back: full computed pages to the prefix cache,
        the rest to the allocator; unlock its cached prefix."""
        if req.prefix_node is None and not req.pages:
            return
        page_size = self.page_size
        aligned = req.kv_len // page_size * page_size
        if cache_it:
            dup = self._cache.insert(req.fill_ids[:aligned], req.pages[: aligned // page_size])
        else:
            dup = aligned
        own = req.prefix_len // page_size
        self._alloc.free(req.pages[own : dup // page_size] + req.pages[aligned // page_size :])
        if req.prefix_node is not None:
            self._cache.dec_lock(req.prefix_node)
        req.pages, req.prefix_node, req.prefix_len, req.kv_len = [], None, 0, 0

    def _finish(self, req: Req, reason: FinishReason, emit: bool = True) -> None:
        req.kv_fetch = None  # a lookup still under way finishes unused
        req.finish_reason = reason
        req.status = ReqStatus.finished(reason)
        req.finish_time = time.time()
        self._reqs.pop(req.rid, None)
        if reason.type == FinishReasonType.ABORT:
            self._stats.aborted += 1
        else:
            self._stats.finished += 1
        if emit:
            self._outputs.append(req.take_out())

    # ---- state --------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Requests waiting or running (what `step` would schedule)."""
        return bool(self._waiting or self._running)

    def has_outputs(self) -> bool:
        """Outputs produced outside a step wait to be sent (`take_outputs`)."""
        return bool(self._outputs)

    def get(self, rid: str) -> Req | None:
        """A waiting or running request."""
        return self._reqs.get(rid)

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while requests run or wait."""
        if self._running or self._waiting:
            return False
        self._cache.reset()
        return True

    def table_sizes(self) -> dict[str, int]:
        """Entries of each per-request table (memory debugging: all 0 when idle)."""
        return {
            "reqs": len(self._reqs),
            "waiting": len(self._waiting),
            "running": len(self._running),
            "pending_outs": len(self._outputs),
        }

    def reset_stats(self) -> None:
        self._stats = SchedulerStats()

    def load(self) -> SchedulerLoad:
        num_free = self._alloc.num_free
        num_cached = self._cache.evictable_pages
        return SchedulerLoad(
            num_running_reqs=len(self._running),
            num_waiting_reqs=len(self._waiting),
            num_tokens=sum(r.kv_len for r in self._running),
            num_used_pages=self._alloc.num_pages - num_free - num_cached,
            num_free_pages=num_free,
            num_cached_pages=num_cached,
            num_total_pages=self._alloc.num_pages,
            prompt_tokens=self._stats.prompt_tokens,
            generation_tokens=self._stats.generation_tokens,
            num_retractions=self._stats.num_retractions,
            cache_hit_tokens=self._cache.hit_tokens,
            cache_query_tokens=self._cache.query_tokens,
            prefill_computed_tokens=self._stats.prefill_computed_tokens,
        )
