"""PD faults on the server side: a prefill killed mid-request, a decode killed after sending
its indices, a decode that never sends them, decode's waiting timeout, a late prefill request.
Each ends the request with an HTTP error naming the cause within the timeout; both pools
end free and the pair keeps serving.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.e2e.pd_faults.cluster import (
    BOOTSTRAP_TIMEOUT,
    Background,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_MAX_FAILURE,
    MARGIN,
    PROMPTS,
    Prefill,
    SP,
    WAITING_TIMEOUT,
    assert_pair_healthy,
    body,
    error_message,
    open_stream,
    pd_generate,
    read_until_end,
    timed_post,
    wait_for,
)

pytestmark = pytest.mark.e2e


# -- 1 ------------------------------------------------------------------------------------
def test_prefill_killed_mid_request(cluster, pair, reference):
    """Decode registered a room with a prefill that then dies: the heartbeat fails the request;
    traffic through another prefill goes on, and a prefill restarted on the dead one's
    bootstrap port is used again."""
    p, d, victim, _ = cluster
    failed_before = d.load()["num_failed_transfers"]
    bg = Background(d.url, body(victim, PROMPTS[0], SP))
    # decode found the prefill, preallocated pages and sent its indices: it now waits for KV
    wait_for(lambda: d.load()["transfer_queue_len"] == 1, 10, "decode to wait for the KV")
    assert d.load()["num_used_pages"] > 0
    time.sleep(0.3)  # the REGISTER frame reaches the victim (localhost: well under a millisecond)
    victim.kill(signal.SIGKILL)
    t_kill = time.time()
    other: dict = {}
    normal = threading.Thread(target=lambda: other.update(out=pd_generate(p, d, PROMPTS[1])))
    normal.start()  # meanwhile, the same decode serves a request through the live prefill
    limit = HEARTBEAT_INTERVAL * HEARTBEAT_MAX_FAILURE + MARGIN
    r, _ = bg.join(limit + 5)
    took = time.time() - t_kill
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "heartbeat" in msg and "KV transfer" in msg, msg
    assert took < limit, f"decode answered {took:.1f}s after the kill (limit {limit:.1f}s): {msg}"
    # the waiting timeout would also have failed it, but only WAITING_TIMEOUT after init
    assert took < WAITING_TIMEOUT
    reborn = Prefill(victim.bootstrap_port)  # loads while the rest is checked
    try:
        normal.join(60)
        assert other["out"]["output_ids"] == reference[1]["output_ids"]
        ld = d.wait_clean()
        assert ld["num_failed_transfers"] == failed_before + 1
        assert httpx.get(d.url + "/health", timeout=5).status_code == 200
        assert_pair_healthy(pair, reference)
        # decode looks the new prefill up afresh (new transfer endpoint) and uses it
        reborn.wait_healthy()
        for prompt, ref in zip(PROMPTS, reference):
            assert pd_generate(reborn, d, prompt)["output_ids"] == ref["output_ids"]
        reborn.wait_clean()
        d.wait_clean()
    finally:
        reborn.stop()


def test_decode_killed_after_sending_indices(cluster, pair, reference):
    """Decode registers a room, then dies before the KV comes: prefill still runs the prompt,
    cannot deliver it, and answers its client with the transfer error, freeing its pages."""
    p, d, _, victim = cluster
    b = body(p, PROMPTS[0], SP)
    Background(victim.url, b)  # its answer never comes: the server dies
    wait_for(lambda: victim.load()["transfer_queue_len"] == 1, 10, "decode to send its indices")
    time.sleep(0.3)  # the REGISTER frame reaches prefill
    victim.kill(signal.SIGKILL)
    r, took = timed_post(p.url, b, timeout=BOOTSTRAP_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "KV transfer" in msg and "sending KV to decode" in msg, msg
    assert took < BOOTSTRAP_TIMEOUT, took
    assert_pair_healthy(pair, reference)


# -- 2 ------------------------------------------------------------------------------------
def test_decode_never_sends_indices(pair, reference):
    """Only prefill gets the request: its sender times out waiting for decode's indices."""
    p, d = pair
    r, took = timed_post(p.url, body(p, PROMPTS[0], SP), timeout=BOOTSTRAP_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "KV transfer" in msg and "page indices" in msg and "BOOTSTRAP_TIMEOUT" in msg, msg
    assert BOOTSTRAP_TIMEOUT - 0.5 <= took < BOOTSTRAP_TIMEOUT + MARGIN, took
    assert_pair_healthy(pair, reference)


# -- 3 ------------------------------------------------------------------------------------
def test_decode_waiting_timeout(pair, reference):
    """Only decode gets the request (prefill alive, never asked): decode gives up. A streamed
    request fails the same way (its status is already 200: the error is the last event)."""
    p, d = pair
    failed_before = d.load()["num_failed_transfers"]
    limit = max(BOOTSTRAP_TIMEOUT, WAITING_TIMEOUT) + MARGIN
    sock = open_stream(d, body(p, PROMPTS[1], SP, stream=True))
    try:
        r, took = timed_post(d.url, body(p, PROMPTS[0], SP), timeout=limit + 10)
        assert r.status_code >= 500, r.text
        msg = error_message(r)
        assert "KV transfer" in msg and "WAITING_TIMEOUT" in msg, msg
        assert took < limit, took
        events = read_until_end(sock, timeout=limit)
    finally:
        sock.close()
    # a failed stream ends with an error event and no [DONE]
    err = events[-1]["error"]
    assert err["code"] >= 500 and "WAITING_TIMEOUT" in err["message"], events
    assert all(not e.get("output_ids") for e in events[:-1]), events
    assert d.wait_clean()["num_failed_transfers"] == failed_before + 2
    assert_pair_healthy(pair, reference)


def test_late_prefill_request_after_decode_gave_up(pair, reference):
    """Decode timed out and told prefill: prefill's request for that room fails at once
    (instead of waiting out its own bootstrap timeout) and frees everything."""
    p, d = pair
    b = body(p, PROMPTS[0], SP)
    r, _ = timed_post(d.url, b, timeout=WAITING_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 500, r.text
    time.sleep(0.3)  # the ABORT frame reaches prefill
    r, took = timed_post(p.url, b, timeout=BOOTSTRAP_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    # prefill reports decode's reason (here decode's waiting timeout), not its own timeout
    assert "KV transfer" in msg and "page indices" not in msg, msg
    assert took < BOOTSTRAP_TIMEOUT - 0.5, f"{took:.1f}s: prefill waited for its timeout ({msg})"
    assert_pair_healthy(pair, reference)
