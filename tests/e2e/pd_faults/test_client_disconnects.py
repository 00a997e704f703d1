"""PD faults from the client: it disconnects while decoding, while decode waits for the KV,
and during prefill; both sides abort and free.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.pd_faults.cluster import (
    BOOTSTRAP_TIMEOUT,
    Background,
    LONG_IDS,
    LONG_SP,
    MARGIN,
    PROMPTS,
    SP,
    WAITING_TIMEOUT,
    assert_pair_healthy,
    body,
    error_message,
    new_room,
    open_stream,
    read_events,
    timed_post,
    wait_for,
)

pytestmark = pytest.mark.e2e


# -- 4 ------------------------------------------------------------------------------------
def test_client_disconnect_while_decoding(pair, reference):
    """A long streamed generation whose client goes away: decode aborts it and frees its pages."""
    p, d = pair
    b = body(p, PROMPTS[1], LONG_SP, stream=True)
    pre = Background(p.url, {**b, "stream": False})
    sock = open_stream(d, b)
    try:
        events = read_events(sock, 3)
        assert len(events[-1]["output_ids"]) < LONG_SP["max_new_tokens"]
        r, _ = pre.join(30)
        assert r.status_code == 200, r.text  # prefill's part (the first token) is done
        assert d.load()["num_running_reqs"] == 1
    finally:
        sock.close()
    t0 = time.time()
    d.wait_clean(timeout=5)
    p.wait_clean(timeout=5)
    assert time.time() - t0 < 5
    gen_before = d.load()["generation_tokens"]
    time.sleep(0.5)
    assert d.load()["generation_tokens"] == gen_before, "decode kept generating after the abort"
    assert_pair_healthy(pair, reference)


def test_client_disconnect_while_waiting_for_kv(pair, reference):
    """The decode client goes away while decode waits for the KV: pages freed at once,
    prefill told (its late request for the room fails instead of waiting)."""
    p, d = pair
    b = body(p, PROMPTS[0], SP, stream=True)
    sock = open_stream(d, b)
    try:
        wait_for(lambda: d.load()["transfer_queue_len"] == 1, 10, "decode to wait for the KV")
    finally:
        sock.close()
    t0 = time.time()
    d.wait_clean(timeout=3)
    assert time.time() - t0 < WAITING_TIMEOUT - 1, "freed by the waiting timeout, not by the disconnect"
    time.sleep(0.3)
    r, took = timed_post(p.url, {**b, "stream": False}, timeout=BOOTSTRAP_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 400, r.text
    msg = error_message(r)
    assert "abort" in msg.lower() and "page indices" not in msg, msg
    assert took < BOOTSTRAP_TIMEOUT - 0.5, f"{took:.1f}s: prefill waited for its timeout ({msg})"
    assert_pair_healthy(pair, reference)


def _holds(p) -> bool:
    """Prefill has the request past its bootstrap: queued for or in its forward passes."""
    ld = p.load()
    return ld["num_running_reqs"] + ld["num_waiting_reqs"] == 1


def test_prefill_client_disconnect_during_prefill_tells_decode(pair, reference):
    """Prefill's client goes away while prefill computes a long prompt: prefill aborts the
    request and tells decode, which answers its client at once (not after WAITING_TIMEOUT)."""
    p, d = pair
    room = new_room()
    b = {
        # a first token of its own: a rerun or another test's prompt never hits prefill's radix
        # cache (a cached prompt is "prefilled" in one step, before the client can go away)
        "input_ids": [100 + room % 40000] + LONG_IDS,
        "sampling_params": SP,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": p.bootstrap_port,
        "bootstrap_room": room,
    }
    dec = Background(d.url, b)
    wait_for(lambda: d.load()["transfer_queue_len"] == 1, 10, "decode to wait for the KV")
    sock = open_stream(p, b)
    try:
        # /get_load is answered between chunks; on a busy box a chunk takes seconds
        wait_for(lambda: _holds(p), 30, "prefill to take the prompt", 0.02)
    finally:
        sock.close()
    t0 = time.time()
    r, _ = dec.join(WAITING_TIMEOUT + MARGIN)
    took = time.time() - t0
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "KV transfer" in msg and "prefill aborted" in msg, msg
    assert took < WAITING_TIMEOUT - 1, f"decode answered after {took:.1f}s: {msg}"
    assert_pair_healthy(pair, reference)
