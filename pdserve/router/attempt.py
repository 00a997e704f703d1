"""What one attempt (plain.py: plain_attempt, pd.py: pd_attempt) uses of the router
(router.py: Router), so that the attempts need not import it."""

from __future__ import annotations

import asyncio
import random
from typing import Coroutine, Protocol

import aiohttp
from aiohttp import web

from pdserve.router.workers import Role, Worker


class AttemptContext(Protocol):
    session: aiohttp.ClientSession | None  # open while the router runs
    upstream_timeout: aiohttp.ClientTimeout
    rng: random.Random  # bootstrap rooms

    def select(self, role: Role, key: str | None, excluded: set[str]) -> Worker:
        """A healthy worker of `role` by the policy, not one of `excluded` (urls)."""

    def begin(self, w: Worker) -> None:
        """Count a request on `w` (load, circuit breaker probe)."""

    def end(self, w: Worker, ok: bool | None) -> None:
        """Uncount it; `ok`: the worker's verdict for its circuit breaker (None: no verdict)."""

    def upstream_headers(self, request: web.Request) -> dict[str, str]: ...

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """A task the router cancels when it stops."""
