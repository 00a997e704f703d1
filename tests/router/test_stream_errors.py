"""A worker that breaks a stream after it started: the client gets an error event in
OpenAI's shape and no `data: [DONE]` (a truncated answer must not look complete)."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import no_health

ROUTES = {
    "/generate": {"text": "hi", "stream": True},
    "/v1/completions": {"model": "fake-model", "prompt": "hi", "stream": True},
    "/v1/chat/completions": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
}


def stream_events(url: str, body: dict) -> tuple[int, list[str]]:
    with httpx.stream("POST", url, json=body, timeout=10) as r:
        return r.status_code, [ln[5:].strip() for ln in r.iter_lines() if ln.startswith("data:")]


def assert_ends_with_error(events: list[str], kept: int) -> dict:
    assert "[DONE]" not in events, events
    *data, last = events
    assert len(data) == kept, events  # the whole events before the break, none cut in half
    for e in data:
        json.loads(e)
    err = json.loads(last)["error"]
    assert err["code"] == 502 and err["type"] and "broke the stream" in err["message"], err
    return err


@pytest.mark.parametrize("path", list(ROUTES))
def test_pd_decode_dies_mid_stream(fakes, make_router, path):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", chunks=4, break_after=2)
    rt = make_router(prefill=[p.url], decode=[d.url], health=no_health())
    status, events = stream_events(rt.url + path, ROUTES[path])
    assert status == 200
    assert_ends_with_error(events, kept=2)


def test_plain_worker_dies_mid_stream(fakes, make_router):
    w = fakes("w1", "regular", chunks=3, break_after=1)
    rt = make_router(worker_urls=[w.url], health=no_health())
    status, events = stream_events(rt.url + "/generate", ROUTES["/generate"])
    assert status == 200
    assert_ends_with_error(events, kept=1)


def test_logprob_merged_stream_broken(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", chunks=3, break_after=1)
    rt = make_router(prefill=[p.url], decode=[d.url], health=no_health())
    status, events = stream_events(rt.url + "/generate", dict(ROUTES["/generate"], return_logprob=True))
    assert status == 200
    assert_ends_with_error(events, kept=1)


def test_stream_without_done_gets_an_error_event(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", chunks=2, send_done=False)
    rt = make_router(prefill=[p.url], decode=[d.url], health=no_health())
    status, events = stream_events(rt.url + "/generate", ROUTES["/generate"])
    assert status == 200 and "[DONE]" not in events and len(events) == 3
    assert "without [DONE]" in json.loads(events[-1])["error"]["message"]


def test_error_event_from_the_worker_is_relayed_as_is(fakes, make_router):
    """A worker that reports its own failure in the stream (and no [DONE]): nothing added."""
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", chunks=1, send_done=False)
    rt = make_router(prefill=[p.url], decode=[d.url], health=no_health())
    d.stream_error = {"error": {"message": "scheduler failed", "type": "Error", "code": 500}}
    status, events = stream_events(rt.url + "/generate", ROUTES["/generate"])
    assert status == 200 and len(events) == 2
    assert json.loads(events[-1])["error"]["message"] == "scheduler failed"


def test_non_streamed_dead_decode_is_a_502_with_a_message(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", chunks=3, break_after=0)
    rt = make_router(prefill=[p.url], decode=[d.url], health=no_health())
    d.break_non_stream = True
    r = httpx.post(rt.url + "/generate", json={"text": "hi"}, timeout=10)
    assert r.status_code == 502
    assert "dropped the answer" in r.json()["error"]["message"]
