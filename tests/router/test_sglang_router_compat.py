"""Wire compatibility: SGLang's published router (`sglang-router`, Rust) in front of the
same fake workers injects the same fields ours does.

`sglang-router` is in the test extras (`pip install -e .[test]`); the test runs only where
`sglang_router` can be imported: installed in this environment, or a
site-packages directory named by SGLANG_ROUTER_PYTHONPATH, e.g.

    python -m venv /tmp/sgr && /tmp/sgr/bin/pip install --no-deps sglang-router orjson setproctitle
    SGLANG_ROUTER_PYTHONPATH=/tmp/sgr/lib/python3.11/site-packages pytest tests/router/test_sglang_router_compat.py
(its other dependencies, aiohttp, fastapi and uvicorn, come from this environment).
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from pdserve.router.config import PrefillSpec

from .conftest import dead_url, wait_for
from tests.conftest import stop_group

EXTRA_PATH = os.environ.get("SGLANG_ROUTER_PYTHONPATH", "")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if EXTRA_PATH:
        env["PYTHONPATH"] = EXTRA_PATH + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _available() -> str | None:
    """None when usable, else why not."""
    probe = "import sglang_router.launch_router, sglang_router.version as v; print(v.__version__)"
    try:
        r = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "importing sglang_router timed out"
    if r.returncode != 0:
        return (
            "sglang-router is not installed (pip install --no-deps sglang-router orjson setproctitle, "
            "or set SGLANG_ROUTER_PYTHONPATH): " + r.stderr.strip().splitlines()[-1:][0]
            if r.stderr.strip()
            else "sglang-router is not importable"
        )
    return None


pytestmark = pytest.mark.skipif(bool(why := _available()), reason=why or "")


@pytest.fixture
def sglang_router(fakes):
    """SGLang's router over two prefills (bootstrap port 9123 and none) and one decode."""
    p1 = fakes("p1", "prefill")
    p2 = fakes("p2", "prefill")
    d = fakes("d1", "decode")
    port = int(dead_url().rsplit(":", 1)[1])
    prom = int(dead_url().rsplit(":", 1)[1])
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--pd-disaggregation",
        "--prefill",
        p1.url,
        "9123",
        "--prefill",
        p2.url,
        "none",
        "--decode",
        d.url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--policy",
        "round_robin",
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(prom),
        "--log-level",
        "error",
    ]
    proc = subprocess.Popen(
        cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.post(url + "/generate", json={"text": "warm-up"}, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        if not wait_for(ready, 60, 0.5):
            pytest.fail("sglang-router did not start serving within 60 s")
        yield url, (p1, p2, d)
    finally:
        stop_group(proc, grace=15)


def _fields(body: dict) -> dict:
    return {k: body[k] for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")}


def _shape(f: dict) -> tuple:
    """What must match between routers: host, port, and the room's type (not its value)."""
    room = f["bootstrap_room"]
    rooms = room if isinstance(room, list) else [room]
    assert all(isinstance(r, int) and 0 <= r <= 2**63 - 1 for r in rooms)
    return (f["bootstrap_host"], f["bootstrap_port"], type(room).__name__, len(rooms))


REQUESTS = [
    ("/generate", {"text": "hello"}),
    ("/generate", {"input_ids": [[1, 2, 3], [4, 5]]}),
    ("/v1/completions", {"model": "fake-model", "prompt": ["a", "b"]}),
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}),
]


def test_same_bootstrap_fields_as_sglang_router(sglang_router, make_router):
    url, (p1, p2, d) = sglang_router
    ours = make_router(
        prefill=[PrefillSpec(p1.url, 9123), PrefillSpec(p2.url, None)], decode=[d.url], policy="round_robin"
    )
    for path, body in REQUESTS:
        shapes = {}
        for name, base in (("sglang", url), ("pdserve", ours.url)):
            for w in (p1, p2, d):
                w.received.clear()
            for _ in range(2):  # round robin: once through each prefill
                r = httpx.post(base + path, json=body, timeout=20)
                assert r.status_code == 200, (name, path, r.text)
            sent = [_fields(b) for b in p1.generation_bodies(path) + p2.generation_bodies(path)]
            # same fields to both sides; the decode saw them in arrival order, which round robin
            # may start at either prefill, so compare as multisets
            assert sorted(sent, key=repr) == sorted((_fields(b) for b in d.generation_bodies(path)), key=repr)
            shapes[name] = sorted((_shape(f) for f in sent), key=repr)
        assert shapes["sglang"] == shapes["pdserve"], (path, shapes)
    # port 9123 for p1 and null for p2, by both routers
    assert {s[1] for s in shapes["pdserve"]} == {9123, None}


def test_same_logprob_merge_and_stream_as_sglang_router(sglang_router, make_router):
    url, (p1, p2, d) = sglang_router
    ours = make_router(prefill=[p1.url, p2.url], decode=[d.url])
    body = {"text": "hi", "return_logprob": True}
    theirs_json = httpx.post(url + "/generate", json=body, timeout=20).json()
    ours_json = httpx.post(ours.url + "/generate", json=body, timeout=20).json()
    assert theirs_json["meta_info"]["input_token_logprobs"] == ours_json["meta_info"]["input_token_logprobs"]
    lines = {}
    for name, base in (("sglang", url), ("pdserve", ours.url)):
        with httpx.stream("POST", base + "/generate", json={"text": "hi", "stream": True}, timeout=20) as r:
            lines[name] = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    assert lines["sglang"] == lines["pdserve"]
