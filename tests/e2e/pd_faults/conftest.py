"""One prefill/decode pair (plus a pair the tests kill) shared by every PD fault test."""

from __future__ import annotations

import pytest

from tests.e2e.pd_faults.cluster import Server, PROMPTS, SP, Decode, Prefill, pd_generate


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the tail of every shared server's log: what the servers
    saw tells a CI flake from a bug (the servers outlive the test; their logs go at exit)."""
    rep = yield
    servers = item.funcargs.get("cluster") if rep.when == "call" and rep.failed else None
    for i, s in enumerate(servers or []):
        assert isinstance(s, Server)
        tail = "\n".join(s.log_text().splitlines()[-40:])
        rep.sections.append((f"{type(s).__name__} #{i} ({s.url}), last 40 log lines", tail))
    return rep


@pytest.fixture(scope="package")
def cluster():
    """The shared pair (prefill, decode), and a prefill and a decode that tests kill."""
    servers = [Prefill(), Decode(), Prefill(), Decode()]
    try:
        for s in servers:
            s.wait_healthy()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="package")
def pair(cluster):
    return cluster[0], cluster[1]


@pytest.fixture(scope="package")
def reference(pair):
    """Outputs of healthy PD requests on the shared pair, before any fault."""
    p, d = pair
    # a cold pair's first handshake (decode fetching prefill's route table, the first connections)
    # can take longer than the short fault timeout these servers run with on a loaded box (CI
    # 2026-12-01: one such miss failed the fixture of 12 tests): warm the pair, retried, first
    for attempt in range(3):
        try:
            pd_generate(p, d, PROMPTS[0])
            break
        except AssertionError:
            if attempt == 2:
                raise
    refs = [pd_generate(p, d, prompt) for prompt in PROMPTS]
    for ref in refs:
        assert len(ref["output_ids"]) == SP["max_new_tokens"], ref
        assert ref["meta_info"]["transfer_time"] is not None
    p.wait_clean()
    d.wait_clean()
    return refs
