"""No input makes a 5xx: property-based fuzzing of every JSON endpoint of the server and
of the router in front of it (plain mode), plus the API keys and the body limit.

Bodies start from a valid request (tiny generations) and get fields replaced by arbitrary
JSON (wrong types, huge numbers, NaN, lone surrogates, deep nesting), or are arbitrary
JSON, or raw bytes (invalid UTF-8, truncated, deeply nested). Every answer must be < 500,
a 4xx must carry a message, a 200 stream must end with [DONE] or an error event, and
afterwards the server must be alive with its KV pool free. Valid requests stay cheap: the
server runs with --context-length 64.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.router.config import HealthCheckConfig, RouterConfig
from pdserve.router.serve import RouterThread
from pdserve.server.guard import ADMIN_PATHS
from tests.conftest import ServerProc

pytestmark = pytest.mark.e2e

USER, ADMIN, ROUTER = "user-key", "admin-key", "router-key"
LIMIT = 65536
EXAMPLES = {"server": 30, "router": 20}  # per endpoint; more locally: PDSERVE_FUZZ_EXAMPLES=500

HUGE = [2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**40, -(10**40), 1e308, -1e308, 5e-324]
texts = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=24)
keys = st.sampled_from(["", "x", "text", "stream", "n", "0", "\u00e9"]) | st.text(max_size=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(HUGE)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(keys, c, max_size=4), max_leaves=12
)

SP_FIELDS = [
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "seed",
    "skip_special_tokens",
    "n",
    "json_schema",
    "regex",
]
OPENAI_FIELDS = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "seed",
    "ignore_eos",
    "stop_token_ids",
    "frequency_penalty",
    "presence_penalty",
    "user",
    "response_format",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "skip_special_tokens",
    "tools",
]

BASES = {
    "/generate": (
        {"text": "Hi", "sampling_params": {"max_new_tokens": 2, "temperature": 0}},
        [
            "text",
            "input_ids",
            "sampling_params",
            "rid",
            "stream",
            "return_logprob",
            "top_logprobs_num",
            "bootstrap_host",
            "bootstrap_port",
            "bootstrap_room",
            "logprob_start_len",
        ]
        + [f"sampling_params.{f}" for f in SP_FIELDS],
    ),
    "/v1/completions": ({"prompt": "Hi", "max_tokens": 2, "temperature": 0}, ["prompt"] + OPENAI_FIELDS),
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0},
        ["messages", "messages.0", "messages.0.role", "messages.0.content"] + OPENAI_FIELDS,
    ),
    "/abort_request": ({"rid": "no-such-request"}, ["rid"]),
    "/flush_cache": ({}, ["x"]),
    # weight sync (#15); /init_weights_update_group, /pause_generation and /release_memory_occupation
    # change the server's state for the other cases and are tested in tests/e2e/test_weight_sync.py
    "/get_weights_by_name": ({"name": "model.norm.weight", "truncate_size": 2}, ["name", "truncate_size"]),
    "/update_weights_from_disk": ({"model_path": "/nonexistent"}, ["model_path", "flush_cache"]),
    "/update_weights_from_tensor": (
        {"serialized_named_tensors": ["AAAA"]},
        ["serialized_named_tensors", "serialized_named_tensors.0", "load_format"],
    ),
    "/update_weights_from_distributed": (
        {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[576]], "group_name": "none"},
        ["names", "dtypes", "shapes", "group_name", "load_format", "shapes.0"],
    ),
    "/destroy_weights_update_group": ({"group_name": "none"}, ["group_name"]),
}

ROUTED = [  # the router's
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/abort_request",
    "/flush_cache",
    # the weight-sync fan-outs (#15; those that change state are tested in test_weight_sync_tp.py)
    "/get_weights_by_name",
    "/update_weights_from_disk",
    "/update_weights_from_tensor",
    "/update_weights_from_distributed",
    "/destroy_weights_update_group",
]

RAW = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"text"',
    b"{}",
    b"NaN",
    b'{"text": "\xff\xfe\xfa"}',
    b"\xff\xfe\x00{",
    b'{"text": "\\ud800"}',
    b'{"text": 1e999}',
    b'{"text": "a", "text": 2}',
    b"[" * 30000 + b"]" * 30000,
    b'{"a":' * 20000 + b"1" + b"}" * 20000,
    b'{"text": "' + b"a" * 60000 + b'"}',
    b'{"input_ids": [' + b"1," * 20000 + b"1]}",
    b'{"text": "a", "bootstrap_host": []}',
    b'{"text": "a", "bootstrap_room": [1, 2]}',
    b'{"text": "a", "rid": {"x": 1}}',
    b'{"text": ["a", "b"], "rid": [[], {}]}',
]


def set_path(body: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    cur = body
    for p in parents:
        nxt = cur[int(p)] if isinstance(cur, list) and p.isdigit() else cur.get(p) if isinstance(cur, dict) else None
        if not isinstance(nxt, (dict, list)):
            nxt = {}
            if isinstance(cur, dict):
                cur[p] = nxt
        cur = nxt
    if isinstance(cur, list) and last.isdigit() and int(last) < len(cur):
        cur[int(last)] = value
    elif isinstance(cur, dict):
        cur[last] = value


@st.composite
def bodies(draw, path: str) -> bytes:
    base, fields = BASES[path]
    mode = draw(st.sampled_from(["mutate"] * 6 + ["delete", "any", "raw"]))
    if mode == "raw":
        return draw(st.sampled_from(RAW))
    if mode == "any":
        return json.dumps(draw(json_values)).encode()
    body = json.loads(json.dumps(base))
    if mode == "delete" and body:
        body.pop(draw(st.sampled_from(sorted(body))))
    for field in draw(st.lists(st.sampled_from(fields) | keys, min_size=1, max_size=3)):
        set_path(body, field, draw(json_values))
    return json.dumps(body).encode()  # NaN / Infinity / lone surrogates as Python writes them


def check(r: httpx.Response, data: bytes) -> None:
    assert r.status_code < 500, (r.status_code, data[:300], r.text[:500])
    if 400 <= r.status_code < 500:
        assert r.text.strip(), (r.status_code, data[:300])
        if r.headers.get("content-type", "").startswith("application/json"):
            msg = r.json()
            assert (msg.get("error") or {}).get("message") or msg.get("message") or msg.get("detail"), msg
    elif r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
        assert events, r.text[:300]
        assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), events[-3:]


@pytest.fixture(scope="module")
def fuzz_server():
    s = ServerProc(
        "--dtype",
        "float32",
        "--max-total-tokens",
        "2048",
        "--context-length",
        "64",
        "--max-running-requests",
        "16",
        "--api-key",
        USER,
        "--admin-api-key",
        ADMIN,
        "--max-payload-size",
        str(LIMIT),
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fuzz_router(fuzz_server):
    cfg = RouterConfig(
        worker_urls=(fuzz_server.url,),
        port=0,
        policy="round_robin",
        api_key=ROUTER,
        worker_api_key=USER,
        worker_admin_api_key=ADMIN,
        max_payload_size=LIMIT,
        request_timeout_secs=60,
        load_check_interval_secs=0,
        health=HealthCheckConfig(interval_secs=1.0, timeout_secs=5.0),
    )
    with RouterThread(cfg) as rt:
        yield rt


def assert_clean(server: ServerProc) -> None:
    assert server.proc.poll() is None, "the server died"
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200
    ld = httpx.get(server.url + "/get_load", headers={"Authorization": f"Bearer {USER}"}, timeout=10).json()
    deadline_ld = ld
    deadline = time.time() + 20
    while (
        deadline_ld["num_used_pages"] or deadline_ld["num_running_reqs"] or deadline_ld["num_waiting_reqs"]
    ) and time.time() < deadline:
        time.sleep(0.1)
        deadline_ld = httpx.get(
            server.url + "/get_load", headers={"Authorization": f"Bearer {USER}"}, timeout=10
        ).json()
    assert deadline_ld["num_used_pages"] == 0 and deadline_ld["num_running_reqs"] == 0, deadline_ld


def fuzz(url: str, path: str, key: str, examples: int) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(timeout=60) as client:
        for data in RAW:  # every raw case every run, then the random ones
            check(client.post(url + path, content=data, headers=headers), data)

        @settings(
            max_examples=int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", examples)),
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(data=bodies(path))
        def run(data: bytes) -> None:
            t0 = time.monotonic()
            r = client.post(url + path, content=data, headers=headers)
            took = time.monotonic() - t0
            if took > 1.0:
                print(f"slow {took:.1f}s {r.status_code} {data[:200]!r}")
            check(r, data)

        run()


@pytest.mark.parametrize("path", list(BASES))
def test_fuzz_server(fuzz_server, path):
    fuzz(fuzz_server.url, path, ADMIN if path in ADMIN_PATHS else USER, EXAMPLES["server"])
    assert_clean(fuzz_server)


@pytest.mark.parametrize("path", ROUTED)
def test_fuzz_router(fuzz_server, fuzz_router, path):
    fuzz(fuzz_router.url, path, ROUTER, EXAMPLES["router"])
    assert_clean(fuzz_server)


# ---- body limit ------------------------------------------------------------------------------
def chunked(total: int, piece: int = 8192):
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        sent += n
        yield b" " * n


@pytest.mark.parametrize("target", ["server", "router"])
def test_body_over_the_limit_is_413(fuzz_server, fuzz_router, target):
    url, key = (fuzz_server.url, ADMIN) if target == "server" else (fuzz_router.url, ROUTER)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for path in ("/generate", "/v1/chat/completions", "/abort_request"):
        # declared length over the limit: refused before the body is read
        r = httpx.post(url + path, content=b"x" * (LIMIT + 1), headers=headers, timeout=30)
        assert r.status_code == 413 and "max-payload-size" in r.json()["error"]["message"], r.text
        # chunked, no length: refused while it streams in, long before 16 MiB were sent
        r = httpx.post(url + path, content=chunked(16 << 20), headers=headers, timeout=30)
        assert r.status_code == 413 and "max-payload-size" in r.json()["error"]["message"], r.text
    ok = httpx.post(
        url + "/generate",
        headers=headers,
        timeout=60,
        json={"text": "Hi" + " " * (LIMIT // 2), "sampling_params": {"max_new_tokens": 1}},
    )
    assert ok.status_code in (200, 400), ok.text  # under the limit: read (a 400 for the prompt length)
    assert_clean(fuzz_server)


# ---- keys -----------------------------------------------------------------------------------
def status(url: str, method: str, path: str, key: str | None, **kw) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, url + path, headers=headers, timeout=30, **kw).status_code


def test_server_keys(fuzz_server):
    u = fuzz_server.url
    gen = {"json": {"text": "Hi", "sampling_params": {"max_new_tokens": 1}}}
    for path in ("/health", "/health_generate"):  # open, as in SGLang
        assert status(u, "GET", path, None) == 200
    for method, path, kw in (
        ("GET", "/get_load", {}),
        ("GET", "/v1/models", {}),
        ("GET", "/metrics", {}),
        ("GET", "/get_server_info", {}),
        ("POST", "/generate", gen),
    ):
        assert status(u, method, path, None, **kw) == 401, path
        assert status(u, method, path, "wrong", **kw) == 401, path
        assert status(u, method, path, USER, **kw) == 200, path
        assert status(u, method, path, ADMIN, **kw) == 200, path  # the admin key opens everything
    for method, path, kw in (("POST", "/flush_cache", {}), ("POST", "/abort_request", {"json": {"rid": "x"}})):
        assert status(u, method, path, None, **kw) == 401, path
        assert status(u, method, path, USER, **kw) == 401, path  # admin paths need the admin key
        assert status(u, method, path, ADMIN, **kw) == 200, path
    r = httpx.get(u + "/get_load", timeout=10)
    assert r.json()["error"]["message"] and r.headers["www-authenticate"] == "Bearer"
    info = httpx.get(u + "/get_server_info", headers={"Authorization": f"Bearer {USER}"}, timeout=10).text
    assert USER not in info and ADMIN not in info  # never shown


def test_router_keys_and_worker_keys(fuzz_router):
    """The router checks its own key and sends the workers theirs (admin key on the admin fan-outs)."""
    u = fuzz_router.url
    gen = {"json": {"text": "Hi", "sampling_params": {"max_new_tokens": 1}}}
    assert status(u, "GET", "/health", None) == 200
    assert status(u, "POST", "/generate", None, **gen) == 401
    assert status(u, "POST", "/generate", USER, **gen) == 401  # a worker's key is not the router's
    assert status(u, "POST", "/generate", ROUTER, **gen) == 200
    r = httpx.post(u + "/flush_cache", headers={"Authorization": f"Bearer {ROUTER}"}, timeout=30)
    assert r.status_code == 200 and r.json()["workers"][0]["status"] == 200, r.text
    r = httpx.post(u + "/abort_request", json={"rid": "x"}, headers={"Authorization": f"Bearer {ROUTER}"}, timeout=30)
    assert r.status_code == 200 and r.json()["workers"][0]["status"] == 200, r.text
    r = httpx.get(u + "/get_load", headers={"Authorization": f"Bearer {ROUTER}"}, timeout=30)
    assert r.json()["workers"][0]["status"] == 200, r.text
