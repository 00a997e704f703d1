"""Retries on a new pair, circuit breaker, health checks and readiness, API key, metrics."""

from __future__ import annotations

import re
import time

import httpx

from pdserve.router.config import CircuitBreakerConfig, RetryConfig

from .conftest import dead_url, no_health, wait_for


def metric(rt, name: str, labels: str = "", headers: dict | None = None) -> float:
    text = httpx.get(rt.url + "/metrics", headers=headers, timeout=5).text
    m = re.search(rf"^pdserve_router_{name}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def workers(rt) -> dict[str, dict]:
    return {w["url"]: w for w in httpx.get(rt.url + "/workers", timeout=5).json()["workers"]}


def test_prefill_5xx_retried_on_another_prefill(fakes, make_router):
    bad = fakes("p_bad", "prefill", fail_statuses=[500])
    good = fakes("p_good", "prefill")
    d = fakes("d1", "decode", response_delay=0.2)  # a real decode waits for prefill's KV
    rt = make_router(prefill=[bad.url, good.url], decode=[d.url], health=no_health())
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 200 and r.json()["text"].startswith("d1")
    assert len(bad.generation_bodies()) == 1 and len(good.generation_bodies()) == 1
    # the retry is a new pair: a new room, the new prefill's fields, to decode again
    first, second = d.generation_bodies()
    assert first["bootstrap_room"] != second["bootstrap_room"]
    assert second == good.generation_bodies()[0]
    assert metric(rt, "retries_total") == 1
    assert metric(rt, "errors_total", '{kind="upstream_5xx"}') == 1


def test_connection_refused_retried_on_live_worker(fakes, make_router):
    dead = dead_url()
    good = fakes("p_good", "prefill")
    d = fakes("d1", "decode")
    rt = make_router(prefill=[dead, good.url], decode=[d.url], health=no_health())
    for _ in range(2):  # round robin puts the dead one first at least once
        r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
        assert r.status_code == 200
    assert metric(rt, "errors_total", '{kind="connection"}') >= 1
    assert metric(rt, "retries_total") >= 1
    assert workers(rt)[dead]["total_failures"] >= 1


def test_decode_503_retried_on_another_decode(fakes, make_router):
    p = fakes("p1", "prefill")
    d_bad = fakes("d_bad", "decode", fail_statuses=[503])
    d_good = fakes("d_good", "decode")
    rt = make_router(prefill=[p.url], decode=[d_bad.url, d_good.url], health=no_health())
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 200 and r.json()["text"].startswith("d_good")


def test_retries_exhausted_returns_last_error(fakes, make_router):
    p = fakes("p1", "prefill", fail_statuses=[500] * 10)
    d = fakes("d1", "decode", response_delay=0.2)
    rt = make_router(
        prefill=[p.url],
        decode=[d.url],
        health=no_health(),
        retry=RetryConfig(max_retries=2, initial_backoff_ms=1, max_backoff_ms=5),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=100),
    )
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 500 and r.json()["error"]["message"] == "p1 fails with 500"
    assert len(p.generation_bodies()) == 3  # 1 + 2 retries
    assert metric(rt, "retries_total") == 2
    assert metric(rt, "errors_total", '{kind="retries_exhausted"}') == 1


def test_all_dead_gives_clear_gateway_error(make_router):
    rt = make_router(
        worker_urls=[dead_url()],
        health=no_health(),
        retry=RetryConfig(max_retries=1, initial_backoff_ms=1, max_backoff_ms=5),
    )
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 502
    msg = r.json()["error"]["message"]
    assert "gave up after 2 attempt" in msg and "regular worker" in msg


def test_circuit_breaker_opens_and_recovers(fakes, make_router):
    bad = fakes("p_bad", "prefill", fail_statuses=[500, 500])
    good = fakes("p_good", "prefill")
    d = fakes("d1", "decode", response_delay=0.05)
    cooldown = 3.0  # long enough for the three requests below on any machine
    rt = make_router(
        prefill=[bad.url, good.url],
        decode=[d.url],
        health=no_health(),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=2, success_threshold=1, timeout_duration_secs=cooldown),
    )
    while len(bad.generation_bodies()) < 2:  # round robin sends every other pair to p_bad
        assert httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200
    opened_at = time.monotonic()
    assert workers(rt)[bad.url]["circuit"] == "open"
    assert metric(rt, "worker_circuit_state", f'{{role="prefill",url="{bad.url}"}}') == 1
    for _ in range(3):  # open: p_bad gets nothing
        assert httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200
    assert time.monotonic() - opened_at < cooldown, "the open phase outlasted the cooldown: raise it"
    assert len(bad.generation_bodies()) == 2
    time.sleep(max(0.0, opened_at + cooldown + 0.1 - time.monotonic()))
    # cooldown over, no traffic since: half-open (one probe at a time); p_bad now answers fine
    assert workers(rt)[bad.url]["circuit"] == "half_open"
    for _ in range(4):
        assert httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200
    assert workers(rt)[bad.url]["circuit"] == "closed"
    assert len(bad.generation_bodies()) > 2


def test_readiness_follows_health_checks(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode")
    rt = make_router(prefill=[p.url], decode=[d.url])
    assert wait_for(lambda: httpx.get(rt.url + "/readiness", timeout=5).status_code == 200)
    d.health_status = 503
    assert wait_for(lambda: httpx.get(rt.url + "/readiness", timeout=5).status_code == 503)
    r = httpx.get(rt.url + "/readiness", timeout=5)
    assert r.json()["workers"]["decode"] == {"healthy": 0, "total": 1}
    assert httpx.get(rt.url + "/health", timeout=5).status_code == 200  # the router itself is alive
    assert metric(rt, "worker_healthy", f'{{role="decode",url="{d.url}"}}') == 0
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 503
    assert "no available decode worker" in r.json()["error"]["message"]
    assert d.generation_bodies() == [] and p.generation_bodies() == []
    d.health_status = 200
    assert wait_for(lambda: httpx.get(rt.url + "/readiness", timeout=5).status_code == 200)
    assert httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200


def test_readiness_detects_dead_worker_at_startup(fakes, make_router):
    p = fakes("p1", "prefill")
    rt = make_router(prefill=[p.url], decode=[dead_url()])
    assert wait_for(lambda: httpx.get(rt.url + "/readiness", timeout=5).status_code == 503)


def test_api_key(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode")
    rt = make_router(prefill=[p.url], decode=[d.url], api_key="sekret")
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=5)
    assert r.status_code == 401
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert r.status_code == 401
    assert httpx.get(rt.url + "/v1/models", timeout=5).status_code == 401
    assert httpx.get(rt.url + "/health", timeout=5).status_code == 200  # probes stay open
    assert d.generation_bodies() == []
    ok = {"Authorization": "Bearer sekret"}
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, headers=ok, timeout=5)
    assert r.status_code == 200
    gen = [x for x in d.received if x.path == "/generate"]
    assert gen[0].headers["Authorization"] == "Bearer sekret"  # forwarded to the workers
    health = [x for x in d.received if x.path == "/health"]
    assert health and health[0].headers.get("Authorization") == "Bearer sekret"
    assert httpx.get(rt.url + "/metrics", timeout=5).status_code == 401  # metrics too
    assert metric(rt, "errors_total", '{kind="unauthorized"}', headers=ok) == 4


def test_metrics_names(fakes, make_router):
    p = fakes("p1", "prefill", load={"num_running_reqs": 2, "num_waiting_reqs": 1, "num_tokens": 40})
    d = fakes("d1", "decode")
    rt = make_router(prefill=[p.url], decode=[d.url], policy="power_of_two")
    httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=5)
    httpx.post(rt.url + "/v1/completions", json={"prompt": "x"}, timeout=5)
    assert wait_for(lambda: metric(rt, "worker_load", f'{{role="prefill",url="{p.url}"}}') == 3)
    text = httpx.get(rt.url + "/metrics", timeout=5).text
    for name in (
        'pdserve_router_requests_total{route="/generate"} 1.0',
        'pdserve_router_requests_total{route="/v1/completions"} 1.0',
        "pdserve_router_retries_total 0.0",
        f'pdserve_router_worker_healthy{{role="decode",url="{d.url}"}} 1.0',
        'pdserve_router_request_duration_seconds_count{route="/generate"} 1.0',
    ):
        assert name in text, name
