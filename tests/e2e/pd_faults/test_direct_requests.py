"""A client that talks to a PD server directly (without the router's bootstrap fields) gets a
400 that points to the router, instead of a 200 with nonsense; the router's requests and
/health_generate (SGLang's fake bootstrap host) still work."""

import httpx

from tests.e2e.pd_faults.cluster import assert_pair_healthy


def test_pd_servers_refuse_requests_without_bootstrap_fields(pair, reference):
    for server in pair:
        for path, body in (
            ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 4}}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
        ):
            r = httpx.post(server.url + path, json=body, timeout=30)
            assert r.status_code == 400, (server.url, path, r.text)
            msg = r.json()["error"]["message"]
            assert "router" in msg and "bootstrap_room" in msg, msg
        assert httpx.get(server.url + "/health_generate", timeout=60).status_code == 200
    assert_pair_healthy(pair, reference)
