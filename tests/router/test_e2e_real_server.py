"""The router in front of a real pdserve server (plain mode), on the default model.

Checks that the real server's shapes (/get_load, /v1/models, SSE) work through the
router and that answers are the server's own, byte for byte where deterministic.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from pdserve.router.workers import parse_load

from .conftest import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def routed(server, make_router):
    rt = make_router(worker_urls=[server.url], policy="power_of_two")
    assert wait_for(lambda: httpx.get(rt.url + "/readiness", timeout=5).status_code == 200, 10)
    return rt


def test_generate_through_router_equals_direct(server, routed):
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    direct = httpx.post(server.url + "/generate", json=body, timeout=120).json()
    via = httpx.post(routed.url + "/generate", json=body, timeout=120).json()
    assert via["text"] == direct["text"]
    with httpx.stream("POST", routed.url + "/generate", json=dict(body, stream=True), timeout=120) as r:
        events = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_openai_client_and_info_through_router(server, routed):
    client = openai.OpenAI(base_url=routed.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(parts) == chat.choices[0].message.content
    load = httpx.get(routed.url + "/get_load", timeout=10).json()["workers"][0]
    assert load["status"] == 200 and parse_load(load["body"]) is not None
    assert httpx.get(routed.url + "/get_server_info", timeout=10).status_code == 200
