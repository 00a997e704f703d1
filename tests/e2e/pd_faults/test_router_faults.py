"""Issue #10's finding: a decode server SIGKILLed while six streams run through the router.
Every client's stream must end with an error event and no `data: [DONE]` (it used to just
stop, so a truncated answer looked complete); the prefill side ends clean."""

from __future__ import annotations

import json
import signal
import threading

import httpx

from pdserve.router.config import HealthCheckConfig, PrefillSpec, RouterConfig
from pdserve.router.serve import RouterThread
from tests.e2e.pd_faults.cluster import Decode

STREAMS = 6
BODIES = {
    "/generate": lambda i: {
        "text": f"Story {i}: once upon a time",
        "stream": True,
        "sampling_params": {"max_new_tokens": 600, "temperature": 0, "ignore_eos": True},
    },
    "/v1/completions": lambda i: {
        "prompt": f"Story {i}: once upon a time",
        "stream": True,
        "max_tokens": 600,
        "temperature": 0,
        "ignore_eos": True,
    },
    "/v1/chat/completions": lambda i: {
        "messages": [{"role": "user", "content": f"Tell story {i}."}],
        "stream": True,
        "max_tokens": 600,
        "temperature": 0,
        "ignore_eos": True,
    },
}


def test_decode_killed_under_six_streams(pair):
    p, _ = pair
    # the victim waits for KV longer than this package's 4 s: the test is about killing it,
    # and six prompts on a loaded 2-core box can take longer than that to prefill
    victim = Decode(SGLANG_DISAGGREGATION_WAITING_TIMEOUT="60")
    victim.wait_healthy()
    cfg = RouterConfig(
        pd_disaggregation=True,
        port=0,
        prefill=(PrefillSpec(p.url, p.bootstrap_port),),
        decode=(victim.url,),
        policy="round_robin",
        load_check_interval_secs=0,
        health=HealthCheckConfig(enabled=False),
        request_timeout_secs=120,
    )
    results: list = [None] * STREAMS
    # one at a time (this package's servers run with 3-4 s transfer timeouts: six prompts
    # prefilled at once on a loaded 2-core box could time out before the kill)
    started = [threading.Event() for _ in range(STREAMS)]
    paths = list(BODIES)

    def run(i: int) -> None:
        path = paths[i % len(paths)]
        events: list[str] = []
        try:
            with httpx.stream("POST", rt.url + path, json=BODIES[path](i), timeout=120) as r:
                assert r.status_code == 200, r.read()
                for ln in r.iter_lines():
                    if ln.startswith("data:"):
                        events.append(ln[5:].strip())
                        if len(events) == 3:
                            started[i].set()
            results[i] = events
        except BaseException as e:  # noqa: BLE001 - checked below
            results[i] = e
        finally:
            started[i].set()

    try:
        with RouterThread(cfg) as rt:
            threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(STREAMS)]
            for i, t in enumerate(threads):
                t.start()
                assert started[i].wait(60) and results[i] is None, f"stream {i} did not start: {results[i]}"
            victim.kill(signal.SIGKILL)
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a client stream did not end"
    finally:
        victim.kill(signal.SIGKILL)
        victim.stop()
    for i, events in enumerate(results):
        assert isinstance(events, list), events
        assert "[DONE]" not in events, (i, events[-3:])
        for e in events[:-1]:
            assert "error" not in json.loads(e), e  # whole events before the break
        err = json.loads(events[-1])["error"]
        assert err["code"] == 502 and "broke the stream" in err["message"], err
    p.wait_clean()
