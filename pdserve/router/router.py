"""The router's state and its request loop: selection, bookkeeping, retries.

`Router` lives on one asyncio event loop (the HTTP app's). `dispatch` runs the
retry loop around one attempt function (`pd_attempt` or `plain_attempt`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable, Coroutine

import aiohttp
from aiohttp import web

from pdserve.json_body import BadRequest, parse_body
from pdserve.router.body import routing_key
from pdserve.router.config import RouterConfig
from pdserve.router.metrics import ErrorKind, RouterMetrics
from pdserve.router.pd import pd_attempt
from pdserve.router.plain import plain_attempt
from pdserve.router.policies import LoadBalancingPolicy, make_policy
from pdserve.router.upstream import AttemptFailed, error_response
from pdserve.router.workers import Role, Worker, WorkerPool

logger = logging.getLogger("pdserve.router")

# headers passed from the client to the workers
FORWARDED_HEADERS = ("Authorization", "X-Request-Id", "traceparent", "tracestate")

Attempt = Callable[["Router", web.Request, str, dict, bytes, "str | None", set], Awaitable[web.StreamResponse]]


class NoWorker(Exception):
    """No available worker of a role (all unhealthy, circuit open, or none registered)."""


class Router:
    """Workers, policies, the upstream HTTP session, metrics and background loops."""

    def __init__(self, config: RouterConfig, rng: random.Random | None = None) -> None:
        self.config = config.validate()
        self.rng = rng or random.Random()
        self.pool = WorkerPool.from_config(config)
        self.metrics = RouterMetrics()
        if config.pd_disaggregation:
            self.policies: dict[Role, LoadBalancingPolicy] = {
                Role.PREFILL: make_policy(config.effective_prefill_policy, config, self.rng),
                Role.DECODE: make_policy(config.effective_decode_policy, config, self.rng),
            }
        else:
            self.policies = {Role.REGULAR: make_policy(config.policy, config, self.rng)}
        self.attempt: Attempt = pd_attempt if config.pd_disaggregation else plain_attempt
        self.session: aiohttp.ClientSession | None = None
        self.upstream_timeout = aiohttp.ClientTimeout(
            total=config.request_timeout_secs, sock_connect=config.connect_timeout_secs
        )
        self._loops: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    @property
    def pd(self) -> bool:
        return self.config.pd_disaggregation

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        # no connection cap: every client stream holds one upstream connection per side
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        headers = self.worker_headers()
        if self.config.health.enabled:
            self._loops.append(asyncio.create_task(self.pool.health_loop(self.session, headers)))
        if self.config.load_check_interval_secs > 0 and any(p.needs_load for p in self.policies.values()):
            self._loops.append(asyncio.create_task(self.pool.load_loop(self.session, headers)))

    async def stop(self) -> None:
        tasks = self._loops + list(self._background)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        if self.session is not None:
            await self.session.close()
            self.session = None

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """A task that may outlive the request (prefill draining); cancelled at stop."""
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)
        return t

    # ---- workers ------------------------------------------------------------------------
    def select(self, role: Role, key: str | None, excluded: set[str]) -> Worker:
        """The policy's pick among available workers, avoiding those that already failed
        this request when there is any other choice."""
        cands = self.pool.available(role)
        if not cands:
            n = len(self.pool.by_role(role))
            why = "none registered" if n == 0 else f"all {n} unhealthy or circuit-open"
            raise NoWorker(f"no available {role.value} worker ({why})")
        fresh = [w for w in cands if w.url not in excluded]
        return self.policies[role].select(fresh or cands, key)

    def begin(self, w: Worker) -> None:
        w.in_flight += 1
        w.total_requests += 1
        w.breaker.on_dispatch()

    def end(self, w: Worker, ok: bool | None) -> None:
        """ok: True success, False the worker failed, None no verdict (cancelled)."""
        w.in_flight -= 1
        if ok is True:
            w.breaker.record_success()
        elif ok is False:
            w.total_failures += 1
            w.breaker.record_failure()
        else:
            w.breaker.on_abandon()

    @property
    def worker_key(self) -> str | None:
        return self.config.worker_api_key or self.config.api_key

    def worker_headers(self, admin: bool = False) -> dict[str, str]:
        """Headers of the router's own calls (health, load, proxied GETs; `admin`: the
        /flush_cache and /abort_request fan-outs)."""
        key = (self.config.worker_admin_api_key or self.worker_key) if admin else self.worker_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def upstream_headers(self, request: web.Request) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        h.update(self.worker_headers())
        for name in FORWARDED_HEADERS:
            if name in request.headers and name not in h:  # the client's key never replaces the router's
                h[name] = request.headers[name]
        return h

    def backoff_s(self, retry: int) -> float:
        """Delay before retry number `retry` (1-based): exponential, capped, jittered."""
        r = self.config.retry
        base = min(r.max_backoff_ms, r.initial_backoff_ms * r.backoff_multiplier ** (retry - 1))
        jitter = 1.0 + r.jitter_factor * (2 * self.rng.random() - 1)
        return max(0.0, base * jitter) / 1000.0

    # ---- the request loop ---------------------------------------------------------------
    async def dispatch(self, request: web.Request, path: str) -> web.StreamResponse:
        """/generate, /v1/completions, /v1/chat/completions: attempts with retries."""
        t0 = time.perf_counter()
        self.metrics.requests.labels(route=path).inc()
        try:
            raw = await request.read()
            try:
                body = parse_body(raw)
                key = routing_key(body, path)
            except BadRequest as e:
                self.metrics.error(ErrorKind.BAD_REQUEST)
                return error_response(400, str(e), "BadRequestError")
            return await self._attempts(request, path, body, raw, key)
        finally:
            self.metrics.duration.labels(route=path).observe(time.perf_counter() - t0)

    async def _attempts(
        self, request: web.Request, path: str, body: dict, raw: bytes, key: str | None
    ) -> web.StreamResponse:
        excluded: set[str] = set()
        last: AttemptFailed | None = None
        attempts = self.config.retry.max_retries + 1
        for i in range(attempts):
            if i:
                self.metrics.retries.inc()
                await asyncio.sleep(self.backoff_s(i))
            try:
                return await self.attempt(self, request, path, body, raw, key, excluded)
            except BadRequest as e:
                self.metrics.error(ErrorKind.BAD_REQUEST)
                return error_response(400, str(e), "BadRequestError")
            except NoWorker as e:
                self.metrics.error(ErrorKind.NO_WORKER)
                if last is None:
                    return error_response(503, str(e), "ServiceUnavailable")
                break
            except AttemptFailed as f:
                self.metrics.error(f.kind)
                last = f
                if not f.retryable:
                    return f.to_response()
                logger.warning("attempt %d/%d on %s failed: %s", i + 1, attempts, path, f.message)
                excluded.add(f.worker.url)
        self.metrics.error(ErrorKind.RETRIES_EXHAUSTED)
        assert last is not None
        if last.status is None:
            last.message = f"{last.message} (gave up after {i + 1} attempt(s))"
        return last.to_response()
