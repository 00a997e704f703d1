"""Routing policies, the prefix tree, the circuit breaker and small helpers (no sockets)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pdserve.router.body import BadRequest, batch_size, routing_key
from pdserve.router.circuit_breaker import CircuitBreaker, CircuitState
from pdserve.router.config import CircuitBreakerConfig, RouterConfig
from pdserve.router.policies import POLICIES, make_policy
from pdserve.router.policies.prefix_tree import PrefixTree, common_prefix_len
from pdserve.router.workers import Role, Worker, WorkerPool, bootstrap_host_of, parse_load

CFG = RouterConfig(worker_urls=("http://a:1",))


def workers(n: int, loads=None) -> list[Worker]:
    out = []
    for i in range(n):
        w = Worker(url=f"http://w{i}:1", role=Role.REGULAR, breaker=CircuitBreaker(CircuitBreakerConfig()))
        w.reported_load = None if loads is None else loads[i]
        out.append(w)
    return out


def test_registry_has_the_four_policies():
    assert set(POLICIES) >= {"random", "round_robin", "power_of_two", "cache_aware"}
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest", CFG)


def test_round_robin_cycles():
    ws = workers(3)
    p = make_policy("round_robin", CFG)
    assert [p.select(ws, None).url for _ in range(6)] == [w.url for w in ws] * 2


def test_random_covers_all():
    ws = workers(4)
    p = make_policy("random", CFG, random.Random(0))
    seen = Counter(p.select(ws, None).url for _ in range(400))
    assert set(seen) == {w.url for w in ws}
    assert min(seen.values()) > 50


def test_power_of_two_prefers_less_loaded():
    ws = workers(2, loads=[100, 3])
    p = make_policy("power_of_two", CFG, random.Random(0))
    assert all(p.select(ws, None) is ws[1] for _ in range(50))
    ws = workers(5, loads=[9, 9, 9, 9, 0])
    picks = Counter(p.select(ws, None).url for _ in range(500))
    # the idle worker wins whenever it is one of the two candidates (2/5 of the time)
    assert picks[ws[4].url] > 150
    # in-flight requests count as load too
    ws = workers(2, loads=[0, 0])
    ws[0].in_flight = 5
    assert p.select(ws, None) is ws[1]


def test_cache_aware_sticks_to_prefix_and_spreads_new_ones():
    ws = workers(3, loads=[0, 0, 0])
    p = make_policy("cache_aware", CFG)
    sys_a = "You are a helpful assistant. " * 20
    sys_b = "Translate the following text into French please. " * 20
    first = p.select(ws, sys_a + "question 1")
    for i in range(10):
        assert p.select(ws, sys_a + f"question {i}") is first
    other = p.select(ws, sys_b + "q")
    assert other is not first  # no match: the least loaded, emptiest tree
    assert p.select(ws, sys_b + "q2") is other


def test_cache_aware_balances_when_imbalanced():
    cfg = RouterConfig(worker_urls=("http://a:1",), balance_abs_threshold=4, balance_rel_threshold=1.5)
    ws = workers(2, loads=[0, 0])
    p = make_policy("cache_aware", cfg)
    text = "shared prefix " * 50
    w = p.select(ws, text)
    w.reported_load = 100  # now heavily loaded: the prefix no longer wins
    assert p.select(ws, text) is not w


def test_prefix_tree_matches_and_splits():
    t = PrefixTree(max_size=10_000)
    t.insert("hello world")
    t.insert("hello there")
    assert t.match_len("hello world!") == 11
    assert t.match_len("hello th") == 8
    assert t.match_len("help") == 3
    assert t.match_len("xyz") == 0
    assert t.size == len("hello ") + len("world") + len("there")
    assert common_prefix_len("abcdef", "zzabcxx", 2) == 3


def test_prefix_tree_memory_is_bounded_lru():
    t = PrefixTree(max_size=1000)
    rng = random.Random(0)
    keep = "K" * 300
    for i in range(300):
        t.insert("".join(rng.choice("abcdefgh") for _ in range(50)))
        t.match_len(keep)  # keeps refreshing one entry...
        if i == 0:
            t.insert(keep)
    assert t.size <= 1000
    assert t.match_len(keep) == len(keep)  # ...so LRU eviction spares it
    assert sum(1 for _ in t._nodes()) < 200


def test_circuit_breaker_state_machine():
    now = [0.0]
    cb = CircuitBreaker(
        CircuitBreakerConfig(failure_threshold=3, success_threshold=2, timeout_duration_secs=10), clock=lambda: now[0]
    )
    cb.record_failure()
    cb.record_failure()
    cb.record_success()  # resets the consecutive count
    cb.record_failure()
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED and cb.can_execute()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.can_execute()
    now[0] = 10.0
    assert cb.state is CircuitState.HALF_OPEN and cb.can_execute()
    cb.on_dispatch()
    assert not cb.can_execute()  # one probe at a time
    cb.record_failure()
    assert cb.state is CircuitState.OPEN  # a failed probe re-opens
    now[0] = 20.0
    cb.on_dispatch()
    cb.record_success()
    assert cb.state is CircuitState.HALF_OPEN
    cb.on_dispatch()
    cb.record_success()
    assert cb.state is CircuitState.CLOSED
    off = CircuitBreaker(CircuitBreakerConfig(enabled=False, failure_threshold=1))
    off.record_failure()
    assert off.can_execute()


def test_health_verdicts_need_consecutive_failures_after_the_first():
    cfg = RouterConfig(worker_urls=("http://a:1",))
    pool = WorkerPool.from_config(cfg)
    w = pool.workers[0]
    pool.record_health(w, False, "down")
    assert not w.healthy  # the very first check decides
    pool.record_health(w, True)
    assert w.healthy
    pool.record_health(w, False)  # failure_threshold=2 by default
    assert w.healthy
    pool.record_health(w, False)
    assert not w.healthy


def test_parse_load_is_lenient():
    assert parse_load({"num_running_reqs": 2, "num_waiting_reqs": 3, "num_tokens": 900}) == 5
    assert parse_load({"load": 7}) == 7
    assert parse_load([{"dp_rank": 0, "load": 2}, {"dp_rank": 1, "load": 5}]) == 7
    assert parse_load([{"num_reqs": 1, "num_tokens": 5}, {"num_reqs": 2}]) == 3
    assert parse_load({"num_tokens": 12}) == 12
    assert parse_load(4) == 4
    assert parse_load({"what": "ever"}) is None and parse_load("busy") is None and parse_load(True) is None


def test_routing_key_and_batch_size():
    assert routing_key({"text": "abc"}, "/generate") == "abc"
    assert routing_key({"text": ["first", "second"]}, "/generate") == "first"
    assert routing_key({"input_ids": [1, 22, 3]}, "/generate") == "1 22 3 "
    assert routing_key({"input_ids": [[1, 2], [3]]}, "/generate") == "1 2 "
    assert routing_key({"prompt": "p"}, "/v1/completions") == "p"
    chat = {
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    }
    assert routing_key(chat, "/v1/chat/completions") == "system: be nice\nuser: hi\n"
    assert routing_key({}, "/generate") is None
    assert batch_size({"text": "a"}, "/generate") is None
    assert batch_size({"text": ["a", "b"]}, "/generate") == 2
    assert batch_size({"input_ids": [[1], [2], [3]]}, "/generate") == 3
    assert batch_size({"input_ids": [1, 2]}, "/generate") is None
    assert batch_size({"prompt": [[1, 2], [3]]}, "/v1/completions") == 2
    assert batch_size({"prompt": [1, 2]}, "/v1/completions") is None
    assert batch_size({"messages": [], "n": 3}, "/v1/chat/completions") is None
    with pytest.raises(BadRequest):
        batch_size({"prompt": []}, "/v1/completions")


def test_bootstrap_host():
    assert bootstrap_host_of("http://10.0.0.5:30000") == "10.0.0.5"
    assert bootstrap_host_of("http://prefill-0.svc:8000") == "prefill-0.svc"
    assert bootstrap_host_of("http://[::1]:30000") == "[::1]"
