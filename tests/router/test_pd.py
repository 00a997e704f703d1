"""PD dispatch over real sockets: bootstrap fields, decode's answer, streaming, logprobs."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from pdserve.router.config import PrefillSpec

from .conftest import wait_for

MAX_ROOM = 2**63 - 1


def pair(fakes, make_router, port: int | None = 8998, **kw):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode")
    rt = make_router(prefill=[PrefillSpec(p.url, port)], decode=[d.url], **kw)
    return p, d, rt


def only_body(worker, path="/generate") -> dict:
    bodies = worker.generation_bodies(path)
    assert len(bodies) == 1, bodies
    return bodies[0]


def test_bootstrap_fields_injected_identically(fakes, make_router):
    p, d, rt = pair(fakes, make_router)
    sent = {"text": "hello world", "sampling_params": {"max_new_tokens": 3, "temperature": 0}, "rid": "r1"}
    r = httpx.post(rt.url + "/generate", json=sent, timeout=10)
    assert r.status_code == 200
    assert r.json()["text"].startswith("d1 says")  # the client gets decode's answer
    pb, db = only_body(p), only_body(d)
    assert pb == db  # the very same JSON to both
    assert pb["bootstrap_host"] == "127.0.0.1"
    assert pb["bootstrap_port"] == 8998
    assert isinstance(pb["bootstrap_room"], int) and 0 <= pb["bootstrap_room"] <= MAX_ROOM
    assert {k: pb[k] for k in sent} == sent  # nothing else changed


def test_bootstrap_port_none_is_sent_as_null(fakes, make_router):
    p, d, rt = pair(fakes, make_router, port=None)
    assert httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200
    body = only_body(p)
    assert "bootstrap_port" in body and body["bootstrap_port"] is None
    assert only_body(d) == body


def test_rooms_are_fresh_per_request(fakes, make_router):
    p, d, rt = pair(fakes, make_router)
    for _ in range(5):
        httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    rooms = [b["bootstrap_room"] for b in p.generation_bodies()]
    assert len(set(rooms)) == 5
    assert rooms == [b["bootstrap_room"] for b in d.generation_bodies()]


@pytest.mark.parametrize(
    "path,body,size",
    [
        ("/generate", {"text": ["a", "b", "c"]}, 3),
        ("/generate", {"input_ids": [[1, 2], [3, 4]]}, 2),
        ("/generate", {"input_ids": [1, 2, 3]}, None),  # one tokenized prompt
        ("/v1/completions", {"model": "fake-model", "prompt": ["a", "b"]}, 2),
        ("/v1/completions", {"model": "fake-model", "prompt": [5, 6, 7]}, None),
        ("/v1/completions", {"model": "fake-model", "prompt": "a"}, None),
        # n > 1 is parallel sampling, not a batch: one room, the server expands it
        (
            "/v1/chat/completions",
            {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "n": 2},
            None,
        ),
    ],
)
def test_batched_requests_get_lists(fakes, make_router, path, body, size):
    p, d, rt = pair(fakes, make_router)
    r = httpx.post(rt.url + path, json=body, timeout=10)
    assert r.status_code == 200, r.text
    pb = only_body(p, path)
    assert pb == only_body(d, path)
    if size is None:
        assert isinstance(pb["bootstrap_room"], int) and pb["bootstrap_host"] == "127.0.0.1"
    else:
        assert pb["bootstrap_host"] == ["127.0.0.1"] * size
        assert pb["bootstrap_port"] == [8998] * size
        rooms = pb["bootstrap_room"]
        assert len(rooms) == size and len(set(rooms)) == size
        assert all(isinstance(x, int) and 0 <= x <= MAX_ROOM for x in rooms)


def test_empty_batch_is_a_bad_request(fakes, make_router):
    p, d, rt = pair(fakes, make_router)
    r = httpx.post(rt.url + "/generate", json={"text": []}, timeout=10)
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = httpx.post(rt.url + "/generate", content=b"{not json", timeout=10)
    assert r.status_code == 400
    assert p.generation_bodies() == [] and d.generation_bodies() == []


def test_openai_routes_return_decode_answer(fakes, make_router):
    p, d, rt = pair(fakes, make_router)
    r = httpx.post(
        rt.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "d1 says hi"
    r = httpx.post(rt.url + "/v1/completions", json={"model": "fake-model", "prompt": "hi"}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "d1 says hi"


def test_stream_is_relayed_in_order_without_buffering(fakes, make_router):
    p = fakes("p1", "prefill")
    gate = threading.Event()
    d = fakes("d1", "decode", chunks=4, chunk_delay=0.02, gate=gate)
    rt = make_router(prefill=[p.url], decode=[d.url])
    events, first_seen_at = [], None
    with httpx.stream("POST", rt.url + "/generate", json={"text": "hi", "stream": True}, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line[5:].strip())
            if first_seen_at is None:
                first_seen_at = time.monotonic()
                # the last chunk cannot have been produced: the decode waits for the gate
                assert len(d.produced) < 4
                gate.set()
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert texts == ["d1 says t0", "d1 says t0 t1", "d1 says t0 t1 t2", "d1 says t0 t1 t2 t3"]
    assert first_seen_at < d.produced[-1]  # the client saw chunk 1 before chunk 4 existed


def test_logprobs_merged_from_prefill(fakes, make_router):
    p, d, rt = pair(fakes, make_router)
    r = httpx.post(rt.url + "/generate", json={"text": "hi", "return_logprob": True}, timeout=10)
    meta = r.json()["meta_info"]
    assert meta["input_token_logprobs"] == [[None, 1, None], [-0.5, 2, None], [-0.25, 3, None]]
    assert meta["output_token_logprobs"] == [[-0.1, 7, None]] * 3  # decode's own
    # batched: element by element
    r = httpx.post(rt.url + "/generate", json={"input_ids": [[1, 2], [3]], "return_logprob": True}, timeout=10)
    out = r.json()
    assert len(out) == 2
    for item in out:
        assert item["meta_info"]["input_token_logprobs"] == [[None, 1, None], [-0.5, 2, None], [-0.25, 3, None]]


def test_logprobs_merged_into_stream(fakes, make_router):
    p, d, rt = pair(fakes, make_router)
    with httpx.stream(
        "POST", rt.url + "/generate", timeout=10, json={"text": "hi", "return_logprob": True, "stream": True}
    ) as r:
        events = [ln[5:].strip() for ln in r.iter_lines() if ln.startswith("data:")]
    assert events[-1] == "[DONE]" and len(events) == 4
    for e in events[:-1]:
        assert json.loads(e)["meta_info"]["input_token_logprobs"] == [
            [None, 1, None],
            [-0.5, 2, None],
            [-0.25, 3, None],
        ]


def test_without_logprobs_nothing_is_merged(fakes, make_router):
    p, d, rt = pair(fakes, make_router)
    r = httpx.post(rt.url + "/generate", json={"text": "hi"}, timeout=10)
    assert "input_token_logprobs" not in r.json()["meta_info"]


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_error_reaches_client_fast_and_cancels_decode(fakes, make_router, stream):
    p = fakes("p1", "prefill", fail_statuses=[400])
    d = fakes("d1", "decode", response_delay=30.0)  # would hang until its bootstrap timeout
    rt = make_router(prefill=[p.url], decode=[d.url])
    t0 = time.monotonic()
    r = httpx.post(rt.url + "/generate", json={"text": "too long", "stream": stream}, timeout=10)
    assert time.monotonic() - t0 < 3.0
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "p1 fails with 400"  # prefill's own error body
    assert wait_for(lambda: d.cancelled == 1, 3.0)  # decode's request was dropped
    assert len(d.generation_bodies()) == 1  # a 4xx is not retried


def test_decode_error_is_passed_through(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", fail_statuses=[422])
    rt = make_router(prefill=[p.url], decode=[d.url])
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["message"] == "d1 fails with 422"


def test_request_timeout_ends_request(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", response_delay=30.0)
    rt = make_router(prefill=[p.url], decode=[d.url], request_timeout_secs=0.5)
    t0 = time.monotonic()
    r = httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert time.monotonic() - t0 < 3.0
    assert r.status_code == 504 and "did not answer" in r.json()["error"]["message"]


def in_flight(rt) -> dict[str, int]:
    return {w["url"]: w["in_flight"] for w in httpx.get(rt.url + "/workers", timeout=5).json()["workers"]}


def test_client_leaving_a_stream_aborts_decode(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", chunks=3, gate=threading.Event())  # never finishes on its own
    rt = make_router(prefill=[p.url], decode=[d.url])
    with httpx.stream("POST", rt.url + "/generate", json={"text": "hi", "stream": True}, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # leave after the first event
    assert wait_for(lambda: d.cancelled == 1, 3.0)
    assert wait_for(lambda: set(in_flight(rt).values()) == {0}, 3.0)


def test_client_leaving_a_request_aborts_decode(fakes, make_router):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", response_delay=30.0)
    rt = make_router(prefill=[p.url], decode=[d.url])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(rt.url + "/generate", json={"text": "hi"}, timeout=0.5)
    assert wait_for(lambda: d.cancelled == 1, 3.0)
    assert wait_for(lambda: set(in_flight(rt).values()) == {0}, 3.0)


def test_concurrent_requests_all_end(fakes, make_router):
    from concurrent.futures import ThreadPoolExecutor

    p = fakes("p1", "prefill")
    d = fakes("d1", "decode", chunk_delay=0.01)
    rt = make_router(prefill=[p.url], decode=[d.url])

    def one(i: int) -> int:
        body = {"text": f"q{i}", "stream": i % 2 == 0}
        with httpx.stream("POST", rt.url + "/generate", json=body, timeout=10) as r:
            r.read()
            return r.status_code

    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(24))) == [200] * 24
    assert len(d.generation_bodies()) == 24
    assert wait_for(lambda: set(in_flight(rt).values()) == {0}, 3.0)
