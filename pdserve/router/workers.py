"""Worker state (health, load, in-flight count, circuit breaker) and the pool of workers.

The pool owns two background loops: health checks (`GET <url>/health`) and, when a
policy needs it, load polling (`GET <url>/get_load`). Both only touch state on the
router's event loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp

from pdserve.router.circuit_breaker import CircuitBreaker, CircuitState
from pdserve.router.config import HealthCheckConfig, RouterConfig, normalize_url

logger = logging.getLogger("pdserve.router")


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    REGULAR = "regular"  # plain (non-PD) mode


def bootstrap_host_of(url: str) -> str:
    """The URL's hostname, IPv6 in brackets (what SGLang's router sends)."""
    host = urlparse(url).hostname or ""
    try:
        ipaddress.IPv6Address(host)
        return f"[{host}]"
    except ValueError:
        return host


def parse_load(obj: Any) -> float | None:
    """A number from a `/get_load` answer, leniently.

    pdserve: `{"num_running_reqs", "num_waiting_reqs", "num_tokens", ...}`;
    SGLang: `{"load": n}` or a list of per-DP-rank dicts (summed).
    Requests (running + waiting) when present, else `load`, else `num_tokens`.
    """
    if isinstance(obj, bool):
        return None
    if isinstance(obj, (int, float)):
        return float(obj)
    if isinstance(obj, list):
        parts = [parse_load(x) for x in obj]
        parts = [p for p in parts if p is not None]
        return sum(parts) if parts else None
    if isinstance(obj, dict):
        if "num_running_reqs" in obj or "num_waiting_reqs" in obj:
            return float(_num(obj.get("num_running_reqs")) + _num(obj.get("num_waiting_reqs")))
        for key in ("load", "num_reqs", "num_tokens"):
            if key in obj and _is_num(obj[key]):
                return float(obj[key])
        for key in ("loads", "workers", "dp_loads"):
            if key in obj:
                return parse_load(obj[key])
    return None


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> float:
    return float(v) if _is_num(v) else 0.0


@dataclass(eq=False)
class Worker:
    """One upstream server as the router sees it."""

    url: str
    role: Role
    breaker: CircuitBreaker
    bootstrap_port: int | None = None  # prefill only; None is sent as null
    healthy: bool = True  # optimistic until the first health check answers
    health_known: bool = False
    health_failures: int = 0  # consecutive
    health_successes: int = 0  # consecutive
    reported_load: float | None = None  # last /get_load, parsed
    in_flight: int = 0  # requests this router has open on it
    total_requests: int = 0
    total_failures: int = 0
    last_error: str | None = None

    @property
    def bootstrap_host(self) -> str:
        return bootstrap_host_of(self.url)

    @property
    def load(self) -> float:
        """What load-aware policies compare: the worker's own report plus our in-flight
        requests (counts recent dispatches the report has not seen yet)."""
        return (self.reported_load or 0.0) + self.in_flight

    @property
    def available(self) -> bool:
        return self.healthy and self.breaker.can_execute()

    def to_json(self) -> dict:
        return {
            "url": self.url,
            "role": self.role.value,
            "bootstrap_port": self.bootstrap_port,
            "healthy": self.healthy,
            "circuit": self.breaker.state.name.lower(),
            "load": self.reported_load,
            "in_flight": self.in_flight,
            "total_requests": self.total_requests,
            "total_failures": self.total_failures,
            "last_error": self.last_error,
        }


@dataclass
class WorkerPool:
    """All workers, by role."""

    config: RouterConfig
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: RouterConfig) -> "WorkerPool":
        pool = cls(config)
        for p in config.prefill:
            pool.add(p.url, Role.PREFILL, p.bootstrap_port)
        for u in config.decode:
            pool.add(u, Role.DECODE)
        for u in config.worker_urls:
            pool.add(u, Role.REGULAR)
        return pool

    def add(self, url: str, role: Role, bootstrap_port: int | None = None) -> Worker:
        url = normalize_url(url)
        if self.get(url) is not None:
            raise ValueError(f"worker {url} is already registered")
        w = Worker(
            url=url, role=role, breaker=CircuitBreaker(self.config.circuit_breaker), bootstrap_port=bootstrap_port
        )
        self.workers.append(w)
        return w

    def remove(self, url: str) -> Worker:
        w = self.get(normalize_url(url))
        if w is None:
            raise KeyError(url)
        self.workers.remove(w)
        return w

    def get(self, url: str) -> Worker | None:
        return next((w for w in self.workers if w.url == url), None)

    def by_role(self, role: Role) -> list[Worker]:
        return [w for w in self.workers if w.role is role]

    def available(self, role: Role) -> list[Worker]:
        return [w for w in self.workers if w.role is role and w.available]

    def healthy(self, role: Role) -> list[Worker]:
        return [w for w in self.workers if w.role is role and w.healthy and w.breaker.state is not CircuitState.OPEN]

    # ---- background loops ---------------------------------------------------------------
    async def check_health_once(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        await asyncio.gather(*(self._check(session, w, headers) for w in list(self.workers)))

    async def _check(self, session: aiohttp.ClientSession, w: Worker, headers: dict[str, str]) -> None:
        h: HealthCheckConfig = self.config.health
        try:
            async with session.get(
                w.url + h.endpoint, headers=headers, timeout=aiohttp.ClientTimeout(total=h.timeout_secs)
            ) as r:
                ok = r.status == 200
                why = f"health check answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok, why = False, f"health check failed: {type(e).__name__}: {e}"
        self.record_health(w, ok, why)

    def record_health(self, w: Worker, ok: bool, why: str = "") -> None:
        """One health-check verdict; the first one decides at once, later flips need the
        configured number of consecutive verdicts."""
        h = self.config.health
        if ok:
            w.health_successes += 1
            w.health_failures = 0
            if not w.healthy and (not w.health_known or w.health_successes >= h.success_threshold):
                logger.info("worker %s (%s) is healthy", w.url, w.role.value)
                w.healthy = True
        else:
            w.health_failures += 1
            w.health_successes = 0
            w.last_error = why
            if w.healthy and (not w.health_known or w.health_failures >= h.failure_threshold):
                logger.warning("worker %s (%s) is unhealthy: %s", w.url, w.role.value, why)
                w.healthy = False
        w.health_known = True

    async def health_loop(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        while True:
            await self.check_health_once(session, headers)
            await asyncio.sleep(self.config.health.interval_secs)

    async def poll_loads_once(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        await asyncio.gather(*(self._poll(session, w, headers) for w in list(self.workers)))

    async def _poll(self, session: aiohttp.ClientSession, w: Worker, headers: dict[str, str]) -> None:
        try:
            async with session.get(
                w.url + "/get_load",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.config.health.timeout_secs),
            ) as r:
                if r.status == 200:
                    w.reported_load = parse_load(await r.json(content_type=None))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            pass  # the health check and the breaker deal with dead workers

    async def load_loop(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        while True:
            await self.poll_loads_once(session, headers)
            await asyncio.sleep(self.config.load_check_interval_secs)
