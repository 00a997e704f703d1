"""Fixtures: fake workers on one background loop, routers in background threads."""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Callable

import pytest

from pdserve.router.config import CircuitBreakerConfig, HealthCheckConfig, PrefillSpec, RetryConfig, RouterConfig
from pdserve.router.serve import RouterThread

from .fake_worker import FakeLoop, FakeWorker


def dead_url() -> str:
    """A 127.0.0.1 URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


@pytest.fixture(scope="session")
def fake_loop():
    fl = FakeLoop()
    yield fl
    fl.close()


@pytest.fixture
def fakes(fake_loop):
    """fakes(name, role, **attrs) -> a started FakeWorker, stopped after the test."""
    started: list[FakeWorker] = []

    def make(name: str, role: str = "decode", **attrs) -> FakeWorker:
        w = FakeWorker(name, role)
        for k, v in attrs.items():
            setattr(w, k, v)
        fake_loop.start(w)
        started.append(w)
        return w

    yield make
    for w in started:
        if w.gate is not None:
            w.gate.set()
        fake_loop.stop(w)


# Fast settings for tests: quick health checks, tiny backoff.
TEST_HEALTH = HealthCheckConfig(interval_secs=0.1, timeout_secs=1.0, failure_threshold=1, success_threshold=1)
TEST_RETRY = RetryConfig(max_retries=3, initial_backoff_ms=5, max_backoff_ms=50)


@pytest.fixture
def make_router():
    """make_router(prefill=[...], decode=[...] | worker_urls=[...], **config) -> RouterThread."""
    started: list[RouterThread] = []

    def make(*, prefill=None, decode=None, worker_urls=None, **kw) -> RouterThread:
        kw.setdefault("port", 0)
        kw.setdefault("health", TEST_HEALTH)
        kw.setdefault("retry", TEST_RETRY)
        kw.setdefault("request_timeout_secs", 20.0)
        kw.setdefault("load_check_interval_secs", 0.05)
        kw.setdefault("policy", "round_robin")
        if prefill is not None:
            kw["pd_disaggregation"] = True
            kw["prefill"] = tuple(p if isinstance(p, PrefillSpec) else PrefillSpec(p) for p in prefill)
            kw["decode"] = tuple(decode or ())
        else:
            kw["worker_urls"] = tuple(worker_urls or ())
        rt = RouterThread(RouterConfig(**kw)).start()
        started.append(rt)
        return rt

    yield make
    for rt in started:
        rt.stop()


def no_health(**overrides) -> HealthCheckConfig:
    return dataclasses.replace(TEST_HEALTH, enabled=False, **overrides)


def breaker(**kw) -> CircuitBreakerConfig:
    return CircuitBreakerConfig(**kw)
