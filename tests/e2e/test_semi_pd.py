"""`pdserve serve --enable-semi-pd` (pdserve/semi_pd/resident_process.py): the same API as
mode null and the same greedy tokens, while the compute split moves under load; its
/semi_pd/status and /semi_pd/reallocate endpoints."""

import concurrent.futures as cf
import json
import os
import time

import httpx
import pytest

from pdserve.semi_pd.step_gate import CAP_ENV
from tests.conftest import ServerProc

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


@pytest.fixture(scope="module")
def semi():
    s = ServerProc(
        "--dtype",
        "float32",
        "--max-total-tokens",
        "8192",
        "--enable-semi-pd",
        "--initial-prefill-sm",
        "60",
        "--initial-decode-sm",
        "40",
        timeout=300,
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def semi_rotation():
    """Also with a prefill cap of 16 tokens (docs/semi_pd.md "The prefill cap"): while decode
    runs, every prompt here is prefilled in several forwards."""
    saved = os.environ.get(CAP_ENV)
    os.environ[CAP_ENV] = "16"
    try:
        s = ServerProc(
            "--dtype",
            "float32",
            "--max-total-tokens",
            "8192",
            "--enable-semi-pd",
            "--semi-pd-switch",
            "rotation",
            timeout=300,
        )
    finally:
        if saved is None:
            os.environ.pop(CAP_ENV)
        else:
            os.environ[CAP_ENV] = saved
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(server):
    return [
        httpx.post(server.url + "/generate", json={"text": p, "sampling_params": SP}, timeout=120).json()
        for p in PROMPTS
    ]


def generate(url: str, prompt: str, stream: bool = False, **sp) -> dict:
    body = {"text": prompt, "sampling_params": {**SP, **sp}, "stream": stream}
    if not stream:
        r = httpx.post(url + "/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()
    last = None
    with httpx.stream("POST", url + "/generate", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                last = json.loads(line[6:])
    return last


def test_greedy_equals_mode_null(semi, reference):
    for p, ref in zip(PROMPTS, reference):
        out = generate(semi.url, p)
        assert out["output_ids"] == ref["output_ids"] and out["text"] == ref["text"]
    one = generate(semi.url, PROMPTS[0], max_new_tokens=1)  # ends at prefill's token
    assert one["output_ids"] == reference[0]["output_ids"][:1]


def test_long_prompt_prefilled_in_chunks_equals_mode_null(semi, server):
    """A prompt over --chunked-prefill-size (512): a chunk that samples nothing, then the last."""
    body = {"input_ids": [(j * 31) % 40000 + 100 for j in range(700)], "sampling_params": SP}
    ref = httpx.post(server.url + "/generate", json=body, timeout=300).json()
    out = httpx.post(semi.url + "/generate", json=body, timeout=300).json()
    assert out["output_ids"] == ref["output_ids"] and len(out["output_ids"]) == SP["max_new_tokens"]
    assert semi.wait_idle_and_free()["num_used_pages"] == 0


def test_split_changes_under_streaming_load_lose_nothing(semi, reference):
    splits = [(50, 50), (80, 20), (30, 70), (70, 30), (60, 40)]
    with cf.ThreadPoolExecutor(len(PROMPTS) * 2) as ex:
        futs = [ex.submit(generate, semi.url, p, True) for p in PROMPTS * 2]
        for pre, dec in splits:
            time.sleep(0.3)
            r = httpx.post(
                semi.url + "/semi_pd/reallocate", json={"prefill_percentage": pre, "decode_percentage": dec}, timeout=30
            )
            assert r.status_code == 200, r.text
            assert r.json()["current_split"] == {"prefill_percentage": pre, "decode_percentage": dec}
        outs = [f.result() for f in futs]
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in reference] * 2
    status = httpx.get(semi.url + "/semi_pd/status", timeout=30).json()
    assert status["is_running"] and status["components"]["prefill_worker"] and status["components"]["decode_worker"]
    assert [c["split"] for c in status["process_rotation_status"]["changes"][-5:]] == [f"{a}/{b}" for a, b in splits]
    assert status["process_rotation_status"]["pin_seconds"]["decode"], status  # workers re-pinned in place
    assert status["metrics"]["num_ttft_samples"] >= 12
    for role in ("prefill", "decode"):  # the worker's forward is a part of the resident's step
        t = status["step_timing"][role]
        assert t["steps"] > 0 and 0 < t["forward_ms_p50"] <= t["wall_ms_p50"], status["step_timing"]
    assert semi.wait_idle_and_free()["num_used_pages"] == 0


def test_rotation_under_streaming_load_loses_nothing(semi_rotation, reference):
    """Process rotation: standby workers with the new shares, switched to between steps; the
    prompts prefilled in forwards of at most 16 tokens while decode runs (the prefill cap)."""
    url = semi_rotation.url
    before = httpx.get(url + "/semi_pd/status", timeout=30).json()
    assert before["process_rotation_status"]["prefill_cap_tokens"] == 16
    steps0 = before["step_timing"]["prefill"]["steps"]
    before = before["workers"]
    splits = [(40, 60), (80, 20)]
    with cf.ThreadPoolExecutor(len(PROMPTS) * 2 + 1) as ex:
        # a long decode first, so that the prompts below come while decode runs: capped
        long = ex.submit(generate, url, "Count slowly from one to a thousand.", True, max_new_tokens=160)
        while httpx.get(url + "/get_load", timeout=30).json()["generation_tokens"] < 2:
            time.sleep(0.05)
        futs = [ex.submit(generate, url, p, True) for p in PROMPTS * 2]
        for pre, dec in splits:
            body = {"prefill_percentage": pre, "decode_percentage": dec}
            assert httpx.post(url + "/semi_pd/reallocate", json=body, timeout=30).status_code == 200
            busy = httpx.post(url + "/semi_pd/reallocate", json=body, timeout=30)  # one rotation at a time
            assert busy.status_code == 409, busy.text
            deadline = time.time() + 240
            while httpx.get(url + "/semi_pd/status", timeout=30).json()["current_split"]["prefill_percentage"] != pre:
                assert time.time() < deadline, "rotation did not finish"
                time.sleep(0.2)
        outs = [f.result() for f in futs]
        assert len(long.result()["output_ids"]) == 160
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in reference] * 2
    st = httpx.get(url + "/semi_pd/status", timeout=30).json()
    rot = st["process_rotation_status"]
    assert rot["mechanism"] == "rotation" and len(rot["rotation_seconds"]) == 2
    assert rot["prefill_cap_tokens"] == 16  # the cap outlives the rotation
    # 12 prompts of 2-50 tokens, ~170 in all, came while decode ran: in forwards of <= 16 tokens
    assert st["step_timing"]["prefill"]["steps"] - steps0 >= 10, st["step_timing"]
    assert all(st["workers"][r]["pid"] != before[r]["pid"] and st["workers"][r]["alive"] for r in before)
    assert semi_rotation.wait_idle_and_free()["num_used_pages"] == 0


def test_status_and_reallocate_errors(semi, server):
    st = httpx.get(semi.url + "/semi_pd/status", timeout=30).json()
    mem = st["unified_memory_status"]["memory_usage"]
    assert mem["total_pages"] == 8192 // 16 and 0 <= mem["utilization_ratio"] <= 1
    assert st["components"]["slo_controller"] is False and st["slo_controller_status"] is None
    for body, needle in [
        ({"prefill_percentage": 80, "decode_percentage": 30}, "over 100 %"),
        ({"prefill_percentage": 0, "decode_percentage": 30}, "1..100"),
        ({"prefill": 50}, "unknown field"),
    ]:
        r = httpx.post(semi.url + "/semi_pd/reallocate", json=body, timeout=30)
        assert r.status_code == 400 and needle in r.text, r.text
    r = httpx.get(server.url + "/semi_pd/status", timeout=30)
    assert r.status_code == 400 and "not enabled" in r.text
    prom = httpx.get(semi.url + "/metrics", timeout=30).text
    assert 'pdserve:semi_pd_share_percent{model_name="SmolLM2-135M-Instruct",role="prefill"}' in prom
    assert "pdserve:semi_pd_slo_attainment" in prom and "pdserve:semi_pd_split_changes_total" in prom
    assert "semi_pd" not in httpx.get(server.url + "/metrics", timeout=30).text
    # the weights live in the workers: RL weight sync and profiling are refused, naming Semi-PD
    r = httpx.post(semi.url + "/get_weights_by_name", json={"name": "model.norm.weight"}, timeout=30)
    assert r.status_code == 501 and "--enable-semi-pd" in r.text, r.text
    r = httpx.post(semi.url + "/pause_generation", timeout=30)
    assert r.status_code == 501 and "--enable-semi-pd" in r.text, r.text
    r = httpx.post(semi.url + "/start_profile", timeout=30)
    assert r.status_code == 400 and "--enable-semi-pd" in r.text, r.text
    assert generate(semi.url, PROMPTS[3])["output_ids"]  # still serving


def test_killed_worker_fails_its_requests_and_comes_back(semi, reference):
    """Kill the decode worker under a request: that request ends with a clear 503, its pages
    are freed, a new worker starts, and the server serves the same tokens again."""
    import os
    import signal
    import threading

    pid = httpx.get(semi.url + "/semi_pd/status", timeout=30).json()["workers"]["decode"]["pid"]
    got = {}

    def long_request():
        got["r"] = httpx.post(
            semi.url + "/generate",
            timeout=300,
            json={
                "text": "Count from one to one thousand:",
                "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True},
            },
        )

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 120
    while httpx.get(semi.url + "/semi_pd/status", timeout=30).json()["metrics"]["decode_queue_length"] < 1:
        assert time.time() < deadline, "the request never reached decode"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    t.join(300)
    r = got["r"]
    assert r.status_code == 503 and "decode worker died" in r.text, r.text
    deadline = time.time() + 240
    while True:
        w = httpx.get(semi.url + "/semi_pd/status", timeout=30).json()["workers"]["decode"]
        if w["alive"] and w["restarts"] == 1 and w["pid"] != pid:
            break
        assert time.time() < deadline, w
        time.sleep(0.5)
    assert semi.wait_idle_and_free()["num_used_pages"] == 0
    out = generate(semi.url, PROMPTS[0])
    assert out["output_ids"] == reference[0]["output_ids"]
