"""1P1D through the router (`pdserve launch`) equals `pdserve serve` (mode null), token
for token, for the tcp and shm backends (cores split, and shared by both servers); streamed and not;
single and concurrent."""

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from pdserve.net import free_port_run
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List the planets of the solar system.",
    "Hello",
    "def add(a, b):",
    "Summarize the plot of Romeo and Juliet in two sentences. " * 4,
]
SP = {"max_new_tokens": 24, "temperature": 0}
# ~1,100 tokens: three chunks of the default 512, so prefill sends the KV of the first two
# while the next one computes (#12)
LONG_PROMPT = " ".join(f"The quick brown fox jumps over the lazy dog number {i}." for i in range(80))


class Launch:
    def __init__(self, backend: str, cpu_split: str = "disjoint", *extra: str) -> None:
        self.port = free_port_run(3)  # the router's port and the two servers' after it
        self.url = f"http://127.0.0.1:{self.port}"
        boot = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pdserve.cli",
                "launch",
                "--port",
                str(self.port),
                "--dtype",
                "float32",
                "--max-total-tokens",
                "8192",
                "--transfer-backend",
                backend,
                "--bootstrap-port-base",
                str(boot),
                "--cpu-split",
                cpu_split,
                *extra,
            ],
            start_new_session=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 240
        for line in self.proc.stdout:
            if "is ready at" in line:
                break
            if time.time() > deadline:
                raise RuntimeError("launch did not become ready")
        else:
            raise RuntimeError(f"launch exited: {self.proc.wait()}")
        # ports follow the router port: prefill = +1, decode = +2
        self.prefill = f"http://127.0.0.1:{self.port + 1}"
        self.decode = f"http://127.0.0.1:{self.port + 2}"

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)


@pytest.fixture(scope="module", params=[("tcp", "disjoint"), ("shm", "shared")], ids=["tcp", "shm-shared-cores"])
def pd(request):
    launch = Launch(*request.param)
    yield launch
    launch.stop()


@pytest.fixture(scope="module")
def reference(server):
    return [
        httpx.post(server.url + "/generate", json={"text": p, "sampling_params": SP}, timeout=120).json()
        for p in PROMPTS
    ]


def pools_free(pd) -> None:
    for url in (pd.prefill, pd.decode):
        deadline = time.time() + 10
        while True:
            ld = httpx.get(url + "/get_load", timeout=10).json()
            if ld["num_used_pages"] == 0 and ld["num_running_reqs"] == 0 or time.time() > deadline:
                break
            time.sleep(0.1)
        assert ld["num_used_pages"] == 0, (url, ld)


def test_non_stream_equals_mode_null(pd, reference):
    for p, ref in zip(PROMPTS, reference):
        out = httpx.post(pd.url + "/generate", json={"text": p, "sampling_params": SP}, timeout=120).json()
        assert out["output_ids"] == ref["output_ids"] and out["text"] == ref["text"]
        assert out["meta_info"]["transfer_time"] is not None
    pools_free(pd)


def test_stream_equals_mode_null(pd, reference):
    for p, ref in zip(PROMPTS[:3], reference):
        chunks = []
        with httpx.stream(
            "POST", pd.url + "/generate", json={"text": p, "sampling_params": SP, "stream": True}, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert chunks[-1]["output_ids"] == ref["output_ids"]
        assert all(ref["text"].startswith(c["text"]) for c in chunks)
    pools_free(pd)


def test_concurrent_equals_mode_null(pd, reference):
    def one(p):
        return httpx.post(pd.url + "/generate", json={"text": p, "sampling_params": SP}, timeout=300).json()

    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        outs = list(ex.map(one, PROMPTS))
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in reference]
    pools_free(pd)


def long_prompt_equals_mode_null(pd, server) -> None:
    body = {"text": LONG_PROMPT, "sampling_params": {**SP, "max_new_tokens": 8}}
    ref = httpx.post(server.url + "/generate", json=body, timeout=300).json()
    out = httpx.post(pd.url + "/generate", json=body, timeout=300).json()
    assert out["meta_info"]["prompt_tokens"] > 2 * 512
    assert out["output_ids"] == ref["output_ids"] and out["text"] == ref["text"]
    pools_free(pd)


def test_long_prompt_sent_per_chunk_equals_mode_null(pd, server):
    long_prompt_equals_mode_null(pd, server)


def test_openai_client_through_router(pd, server):
    kw = dict(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=20
    )
    ref = openai.OpenAI(base_url=server.url + "/v1", api_key="x").chat.completions.create(**kw)
    c = openai.OpenAI(base_url=pd.url + "/v1", api_key="x")
    r = c.chat.completions.create(**kw)
    assert r.choices[0].message.content == ref.choices[0].message.content == "The capital of France is Paris."
    text = "".join(
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True) if ch.choices
    )
    assert text == ref.choices[0].message.content
    comp = c.completions.create(model="SmolLM2-135M-Instruct", prompt="The sky is", max_tokens=8, temperature=0)
    assert comp.usage.completion_tokens == 8
    pools_free(pd)


def test_structured_output_equals_mode_null(pd, server):
    """The grammar holds across the split: prefill masks the first token, decode replays
    its matcher over it and continues; the result equals mode null token for token."""
    import re

    rx = r"(yes|no), because [a-z ]{1,12}\."
    body = {"text": "Is the sky blue? Answer:", "sampling_params": {**SP, "max_new_tokens": 24, "regex": rx}}
    ref = httpx.post(server.url + "/generate", json=body, timeout=120).json()
    out = httpx.post(pd.url + "/generate", json=body, timeout=120).json()
    assert out["output_ids"] == ref["output_ids"] and re.fullmatch(rx, out["text"]), out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    pools_free(pd)


def test_decode_metrics_and_load(pd):
    httpx.post(pd.url + "/generate", json={"text": PROMPTS[0], "sampling_params": SP}, timeout=120).raise_for_status()
    ld = httpx.get(pd.decode + "/get_load").json()
    for k in ("prealloc_queue_len", "transfer_queue_len", "num_failed_transfers", "kv_transfer_gbps"):
        assert k in ld
    assert ld["kv_transfers_completed"] > 0 and ld["num_failed_transfers"] == 0
    m = httpx.get(pd.decode + "/metrics").text
    for name in (
        "pdserve:num_prealloc_queue_reqs",
        "pdserve:num_transfer_queue_reqs",
        "pdserve:kv_transfer_latency_seconds",
        "pdserve:kv_transfer_speed_gb_s",
        "pdserve:num_failed_transfers_total",
    ):
        assert name in m, name
    assert "pdserve:num_bootstrap_queue_reqs" in httpx.get(pd.prefill + "/metrics").text


def test_phase_split_separates_prefill_from_transfer(pd):
    """Decode's meta_info tells prefill's forward apart from the KV transfer: the receiver
    times the transfer itself (first byte to Success), the rest of the wait is prefill."""
    r = httpx.post(pd.url + "/generate", json={"text": PROMPTS[-1], "sampling_params": SP}, timeout=120).json()
    mi = r["meta_info"]
    pt, tt = mi["prefill_time"], mi["transfer_time"]
    assert pt > 0 and tt > 0  # tcp and shm both move bytes: the receiver times them
    # a few pages over loopback against a ~70-token fp32 forward: the transfer is the small part
    assert tt < 0.5 * (pt + tt), mi
    assert pt + tt <= mi["e2e_latency"] + 1e-3, mi
    pools_free(pd)
