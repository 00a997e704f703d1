"""A real `pdserve serve` process on the default model (float32): native and OpenAI
APIs, the official openai client, bad input, disconnects, metrics, shutdown."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import ServerProc

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True)
def pool_back_to_free(server):
    yield
    ld = server.wait_idle_and_free()
    assert ld["num_used_pages"] == 0, ld


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def gen(server, **body):
    return httpx.post(server.url + "/generate", json=body, timeout=120)


def stream_generate(server, body):
    chunks = []
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def test_openai_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0


def test_openai_chat_stream(client):
    s = client.chat.completions.create(
        model=MODEL, messages=Q, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}
    )
    text, usage, finish = "", None, None
    for ch in s:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == "The capital of France is Paris."
    assert finish == "stop" and usage.completion_tokens == 8


def test_openai_completions_stream_equals_non_stream(client):
    kw = dict(model=MODEL, prompt="The three primary colors are", temperature=0, max_tokens=24)
    full = client.completions.create(**kw)
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert text == full.choices[0].text and len(text) > 10
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"


def test_openai_n_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, n=3, temperature=0.8, seed=1, logprobs=2)
    assert len(r.choices) == 3 and r.usage.completion_tokens == 15
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    c = client.chat.completions.create(
        model=MODEL, messages=Q, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    assert len(c.choices[0].logprobs.content) == 4 and len(c.choices[0].logprobs.content[0].top_logprobs) == 3


def test_generate_stream_equals_non_stream(server):
    body = {"text": "List three fruits:", "sampling_params": {"max_new_tokens": 30, "temperature": 0}}
    full = gen(server, **body).json()
    chunks = stream_generate(server, body)
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    assert len(chunks) > 3


def test_generate_batch_and_input_ids(server):
    r = gen(server, text=["Hello", "The sky is"], sampling_params={"max_new_tokens": 4, "temperature": 0})
    outs = r.json()
    assert isinstance(outs, list) and len(outs) == 2
    single = gen(
        server,
        input_ids=outs[1]["output_ids"][:1] and [504, 9531, 314],
        sampling_params={"max_new_tokens": 3, "temperature": 0},
        return_logprob=True,
    ).json()
    assert len(single["meta_info"]["output_token_logprobs"]) == 3
    itl = single["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in itl] == [504, 9531, 314] and itl[0][0] is None and all(x[0] <= 0 for x in itl[1:])


def test_multibyte_characters_stream_intact(server):
    body = {
        "text": "Write the word 'café' and an emoji 🎉 three times:",
        "sampling_params": {"max_new_tokens": 40, "temperature": 0},
    }
    chunks = stream_generate(server, body)
    final = chunks[-1]["text"]
    # no chunk shows a half character that a later chunk rewrites
    assert all(final.startswith(c["text"]) for c in chunks)
    assert final == gen(server, **body).json()["text"]


def test_stop_string(server):
    r = gen(
        server, text="1, 2, 3, 4, 5,", sampling_params={"max_new_tokens": 30, "temperature": 0, "stop": [" 8"]}
    ).json()
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": " 8"}
    assert " 8" not in r["text"] and "7" in r["text"]


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/generate", "{not json", "malformed JSON"),
        ("/generate", {"sampling_params": {}}, "text"),
        ("/generate", {"text": 5}, "text must be"),
        ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "many"}}, "max_new_tokens"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**9}}, "context length"),
        ("/generate", {"input_ids": [10**8]}, "input_ids"),
        ("/generate", {"text": "hi " * 9000}, "context length"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/completions", {"prompt": "hi", "top_p": 7}, "top_p"),
        ("/v1/completions", {"prompt": "hi", "n": 1000}, "n must"),
    ],
)
def test_bad_input_is_400(server, path, body, needle):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert gen(server, text="ok", sampling_params={"max_new_tokens": 1}).status_code == 200


def test_prompt_larger_than_kv_pool_is_400():
    s = ServerProc("--dtype", "float32", "--max-total-tokens", "256", "--page-size", "16")
    try:
        r = httpx.post(s.url + "/generate", json={"text": "hello " * 400}, timeout=30)
        assert r.status_code == 400 and "KV pool" in r.json()["error"]["message"]
        # a request that fits, but outgrows the pool with another one running, still completes
        body = {"text": ["count: 1 2 3", "say: a b c"], "sampling_params": {"max_new_tokens": 150, "ignore_eos": True}}
        outs = httpx.post(s.url + "/generate", json=body, timeout=120).json()
        assert [o["meta_info"]["completion_tokens"] for o in outs] == [150, 150]
        assert httpx.get(s.url + "/get_load").json()["num_retractions"] > 0
        assert s.wait_idle_and_free()["num_used_pages"] == 0
    finally:
        s.stop()


def test_client_disconnect_mid_stream_frees_pages(server):
    before = server.wait_idle_and_free()["generation_tokens"]
    body = {
        "text": "Tell me a long story.",
        "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True},
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
        for i, line in enumerate(r.iter_lines()):
            if i == 2:
                assert server.load()["num_running_reqs"] == 1  # generating while the client reads
            if i > 6:
                break  # leaving iter_lines() closes the connection: the client is gone
    ld = server.wait_idle_and_free()
    assert ld["num_running_reqs"] == 0 and ld["num_used_pages"] == 0
    assert ld["generation_tokens"] - before < 2000  # aborted, not run to the end


def test_client_disconnect_non_stream_frees_pages(server):
    before = server.wait_idle_and_free()["generation_tokens"]
    with pytest.raises(httpx.TimeoutException):  # 3000 tokens take far longer than 1.5 s
        httpx.post(
            server.url + "/generate",
            json={"text": "Story:", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}},
            timeout=1.5,
        )
    ld = server.wait_idle_and_free()
    assert ld["num_running_reqs"] == 0 and ld["num_used_pages"] == 0
    assert ld["generation_tokens"] - before < 3000  # aborted, not run to the end


def test_info_endpoints_and_metrics(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health_generate", timeout=60).status_code == 200
    assert [m.id for m in client.models.list()] == [MODEL]
    info = httpx.get(server.url + "/get_server_info").json()
    assert info["max_total_num_tokens"] == 16384 and info["dtype"] == "float32"
    assert httpx.get(server.url + "/get_model_info").json()["model_path"].endswith(".gguf")
    gen(server, text="The capital of France is", sampling_params={"max_new_tokens": 4})
    m = httpx.get(server.url + "/metrics").text
    for name in (
        "pdserve:time_to_first_token_seconds_bucket",
        "pdserve:inter_token_latency_seconds_bucket",
        "pdserve:e2e_request_latency_seconds_count",
        "pdserve:num_running_reqs",
        "pdserve:num_queue_reqs",
        "pdserve:token_usage",
        "pdserve:cache_hit_rate",
        "pdserve:prompt_tokens_total",
        "pdserve:generation_tokens_total",
    ):
        assert name in m, name
    assert httpx.post(server.url + "/flush_cache").status_code == 200
    r = httpx.post(server.url + "/abort_request", json={"rid": "nope"})
    assert r.status_code == 200 and r.json()["success"] is False


def test_cli_bad_flag_names_it():
    r = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "serve", "--page-size", "0"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "--page-size" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "serve", "--model-path", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--model-path" in r.stderr


def test_sigterm_leaves_no_orphans():
    s = ServerProc("--dtype", "float32", "--max-total-tokens", "1024")
    children = subprocess.run(["pgrep", "-P", str(s.proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the scheduler child process should exist"
    os.kill(s.proc.pid, signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert s.proc.wait(30) == -signal.SIGTERM

    def gone(pid: str) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    # the child exits on its own (PDEATHSIG -> leaves its loop, frees its pool); on a loaded
    # machine interpreter teardown can take more than a second, so wait for it, boundedly
    deadline = time.time() + 15
    while not all(gone(p) for p in children) and time.time() < deadline:
        time.sleep(0.2)
    for pid in children:
        assert gone(pid), f"scheduler process {pid} outlived its server"
