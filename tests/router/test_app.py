"""Plain mode, policies over HTTP, proxied endpoints, admin, the OpenAI client, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import httpx
import openai
import pytest

from pdserve.router.cli import config_from_args

from .conftest import dead_url, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def served_by(workers, path="/generate") -> Counter:
    return Counter({w.name: len(w.generation_bodies(path)) for w in workers})


def test_plain_mode_balances_and_forwards_unchanged(fakes, make_router):
    ws = [fakes(f"w{i}", "regular") for i in range(3)]
    rt = make_router(worker_urls=[w.url for w in ws], policy="round_robin")
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 2}}
    for _ in range(6):
        assert httpx.post(rt.url + "/generate", json=body, timeout=10).status_code == 200
    assert served_by(ws) == {"w0": 2, "w1": 2, "w2": 2}
    assert ws[0].generation_bodies()[0] == body  # no bootstrap fields in plain mode
    with httpx.stream(
        "POST",
        rt.url + "/v1/chat/completions",
        timeout=10,
        json={"messages": [{"role": "user", "content": "x"}], "stream": True},
    ) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and len(lines) == 4


def test_plain_mode_retries_dead_worker(fakes, make_router):
    w = fakes("w0", "regular")
    from .conftest import no_health

    rt = make_router(worker_urls=[dead_url(), w.url], health=no_health())
    for _ in range(3):
        assert httpx.post(rt.url + "/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 200
    assert len(w.generation_bodies()) == 3


def test_power_of_two_uses_get_load(fakes, make_router):
    p = fakes("p1", "prefill")
    busy = fakes("busy", "decode", load={"num_running_reqs": 40, "num_waiting_reqs": 9, "num_tokens": 9000})
    idle = fakes("idle", "decode", load=[{"dp_rank": 0, "load": 0}])  # SGLang's list shape
    rt = make_router(
        prefill=[p.url], decode=[busy.url, idle.url], decode_policy="power_of_two", prefill_policy="random"
    )
    assert wait_for(
        lambda: all(
            w["load"] is not None for w in httpx.get(rt.url + "/workers").json()["workers"] if w["role"] == "decode"
        )
    )
    for _ in range(8):
        assert httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200
    assert served_by([busy, idle]) == {"busy": 0, "idle": 8}


def test_cache_aware_sticks_over_http(fakes, make_router):
    ps = [fakes(f"p{i}", "prefill") for i in range(2)]
    d = fakes("d1", "decode")
    rt = make_router(
        prefill=[p.url for p in ps], decode=[d.url], prefill_policy="cache_aware", decode_policy="round_robin"
    )
    system = "You are a careful assistant that answers in one line. " * 10
    for i in range(6):
        r = httpx.post(
            rt.url + "/v1/chat/completions",
            timeout=10,
            json={"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]},
        )
        assert r.status_code == 200
    counts = served_by(ps, "/v1/chat/completions")
    assert sorted(counts.values()) == [0, 6]  # all on one prefill
    httpx.post(rt.url + "/generate", json={"text": "something else entirely " * 20}, timeout=10)
    assert sorted(served_by(ps).values()) == [0, 1]  # a new prefix goes to the other (idle) one
    assert served_by(ps)[min(counts, key=counts.get)] == 1


def test_proxied_and_fan_out_endpoints(fakes, make_router):
    p = fakes("p1", "prefill", load={"num_running_reqs": 1, "num_waiting_reqs": 0, "num_tokens": 5})
    d = fakes("d1", "decode")
    rt = make_router(prefill=[p.url], decode=[d.url])
    models = httpx.get(rt.url + "/v1/models", timeout=5).json()
    assert models["data"][0]["id"] == "fake-model" and models["data"][0]["owned_by"] == "d1"
    assert httpx.get(rt.url + "/get_model_info", timeout=5).json()["worker"] == "d1"
    info = httpx.get(rt.url + "/get_server_info", timeout=5).json()
    assert [x["name"] for x in info["prefill"]] == ["p1"] and [x["name"] for x in info["decode"]] == ["d1"]
    assert info["internal_states"] == [{"last_gen_throughput": 1.0, "worker": "d1"}]
    r = httpx.post(rt.url + "/flush_cache", timeout=5)
    assert r.status_code == 200 and r.json()["success"]
    assert all(any(x.path == "/flush_cache" for x in w.received) for w in (p, d))
    for path in ("/start_profile", "/stop_profile"):  # every worker profiles, each names its trace by role
        r = httpx.post(rt.url + path, json={"num_steps": 3} if path == "/start_profile" else None, timeout=5)
        assert r.status_code == 200 and r.json()["success"]
        assert sorted(x["body"]["trace_path"] for x in r.json()["workers"]) == ["/tmp/x-decode", "/tmp/x-prefill"]
        assert all(any(x.path == path for x in w.received) for w in (p, d))
    load = httpx.get(rt.url + "/get_load", timeout=5).json()
    assert load["prefill"][0]["load"] == 1 and load["decode"][0]["load"] == 0
    hg = httpx.get(rt.url + "/health_generate", timeout=5)
    assert hg.status_code == 200
    ws = httpx.get(rt.url + "/workers", timeout=5).json()
    assert ws["mode"] == "pd" and {w["role"] for w in ws["workers"]} == {"prefill", "decode"}


def test_add_and_remove_workers(fakes, make_router):
    p = fakes("p1", "prefill")
    d1 = fakes("d1", "decode")
    d2 = fakes("d2", "decode")
    rt = make_router(prefill=[p.url], decode=[d1.url])
    r = httpx.post(rt.url + "/add_worker", params={"url": d2.url, "role": "decode"}, timeout=5)
    assert r.status_code == 200
    assert httpx.post(rt.url + "/add_worker", params={"url": d2.url, "role": "decode"}).status_code == 400
    for _ in range(4):
        httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert served_by([d1, d2]) == {"d1": 2, "d2": 2}
    assert httpx.post(rt.url + "/remove_worker", params={"url": d1.url}).status_code == 200
    for _ in range(2):
        httpx.post(rt.url + "/generate", json={"text": "x"}, timeout=10)
    assert served_by([d1, d2]) == {"d1": 2, "d2": 4}


@pytest.mark.parametrize("stream", [False, True])
def test_official_openai_client(fakes, make_router, stream):
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode")
    rt = make_router(prefill=[p.url], decode=[d.url])
    client = openai.OpenAI(base_url=rt.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    msgs = [{"role": "user", "content": "hi"}]
    if stream:
        parts = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="fake-model", messages=msgs, stream=True)
        ]
        assert "".join(parts) == "t0 t1 t2 "
        texts = [c.choices[0].text for c in client.completions.create(model="fake-model", prompt="hi", stream=True)]
        assert "".join(texts) == "t0 t1 t2 "
    else:
        chat = client.chat.completions.create(model="fake-model", messages=msgs)
        assert chat.choices[0].message.content == "d1 says hi"
        comp = client.completions.create(model="fake-model", prompt="hi")
        assert comp.choices[0].text == "d1 says hi"
        assert [m.id for m in client.models.list()] == ["fake-model"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = d.generation_bodies(path)[0]
        assert body == p.generation_bodies(path)[0] and "bootstrap_room" in body


def test_cli_flags():
    c = config_from_args(
        [
            "--pd-disaggregation",
            "--prefill",
            "http://10.0.0.1:30000",
            "9000",
            "--prefill",
            "10.0.0.2:30000",
            "none",
            "--prefill",
            "http://10.0.0.3:30000",
            "--decode",
            "http://10.0.0.4:30001",
            "--decode",
            "http://10.0.0.5:30001",
            "--prefill-policy",
            "cache_aware",
            "--decode-policy",
            "power_of_two",
            "--max-retries",
            "5",
            "--api-key",
            "k",
        ]
    )
    assert [(p.url, p.bootstrap_port) for p in c.prefill] == [
        ("http://10.0.0.1:30000", 9000),
        ("http://10.0.0.2:30000", None),
        ("http://10.0.0.3:30000", None),
    ]
    assert c.decode == ("http://10.0.0.4:30001", "http://10.0.0.5:30001")
    assert (c.effective_prefill_policy, c.effective_decode_policy) == ("cache_aware", "power_of_two")
    assert c.retry.max_retries == 5 and c.api_key == "k" and c.host == "127.0.0.1"
    plain = config_from_args(["--worker-urls", "http://a:1", "http://b:2", "--policy", "random", "--disable-retries"])
    assert plain.worker_urls == ("http://a:1", "http://b:2") and plain.retry.max_retries == 0


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--pd-disaggregation", "--prefill", "http://a:1", "x", "--decode", "http://b:1"], "--prefill"),
        (["--pd-disaggregation", "--prefill", "http://a:1", "70000", "--decode", "http://b:1"], "--prefill"),
        (["--pd-disaggregation", "--prefill", "http://a:1"], "--decode"),
        (["--worker-urls", "http://a:1", "--policy", "fastest"], "--policy"),
        (["--worker-urls", "http://a:1", "--cache-threshold", "1.5"], "--cache-threshold"),
        (["--worker-urls", "http://a:1", "--port", "99999"], "--port"),
        (["--worker-urls", "ftp://a:1"], "--worker-urls"),
        (["--worker-urls", "http://a:1", "--max-retries", "-1"], "--retry-max-retries"),
        ([], "--worker-urls"),
    ],
)
def test_cli_errors_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_router_process_is_light_and_serves(fakes):
    """`pdserve router` as a process: no torch imported, serves, stops on SIGTERM."""
    code = (
        "import sys, pdserve.cli, pdserve.router.cli, pdserve.router.serve, pdserve.router.app; "
        "assert 'torch' not in sys.modules, 'router imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
    p = fakes("p1", "prefill")
    d = fakes("d1", "decode")
    port = int(dead_url().rsplit(":", 1)[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "router",
            "--pd-disaggregation",
            "--prefill",
            p.url,
            "none",
            "--decode",
            d.url,
            "--port",
            str(port),
            "--log-level",
            "warn",
        ],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(up, 30, 0.1)
        r = httpx.post(url + "/generate", json={"text": "x"}, timeout=10)
        assert r.status_code == 200 and r.json()["text"].startswith("d1")
        assert p.generation_bodies()[0]["bootstrap_port"] is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(15) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
