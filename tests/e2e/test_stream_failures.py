"""The server ends every failed stream with an error event (OpenAI's shape) and no
`data: [DONE]`: a request aborted while it streams, and a scheduler that dies under a
running stream (then /health is 503 and new requests get 503 with a message)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import ServerProc

pytestmark = pytest.mark.e2e

LONG = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}


def stream_lines(url: str, path: str, body: dict, on_first=None, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    with httpx.stream("POST", url + path, json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for ln in r.iter_lines():
            if ln.startswith("data:"):
                lines.append(ln[5:].strip())
                if len(lines) == 2 and on_first is not None:
                    on_first()
    return lines


def assert_error_end(lines: list[str], code: int | None = None) -> dict:
    assert lines and "[DONE]" not in lines, lines[-3:]
    err = json.loads(lines[-1])["error"]
    assert err["message"] and err["type"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_aborted_stream_ends_with_error_event(server):
    rid = f"abort-{time.time()}"
    body = {"text": "Count to one thousand:", "sampling_params": LONG, "stream": True, "rid": rid}

    def abort() -> None:
        r = httpx.post(server.url + "/abort_request", json={"rid": rid}, timeout=10)
        assert r.json()["success"], r.text

    lines = stream_lines(server.url, "/generate", body, on_first=abort)
    assert_error_end(lines)
    assert server.wait_idle_and_free()["num_used_pages"] == 0


def test_scheduler_death_ends_streams_with_error_events():
    s = ServerProc("--dtype", "float32", "--max-total-tokens", "4096")
    try:
        sched = [
            c
            for c in psutil.Process(s.proc.pid).children(recursive=True)
            if "scheduler_process" in " ".join(c.cmdline())
        ]
        assert len(sched) == 1, sched
        results: dict[str, list[str] | BaseException] = {}
        started = threading.Barrier(4)

        def run(path: str, body: dict) -> None:
            try:
                results[path] = stream_lines(s.url, path, body, on_first=lambda: started.wait(60))
            except BaseException as e:  # noqa: BLE001 - checked below
                results[path] = e
                started.abort()

        jobs = {
            "/generate": {"text": "Count to one thousand:", "sampling_params": LONG, "stream": True},
            "/v1/completions": {"prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True},
            "/v1/chat/completions": {
                "messages": [{"role": "user", "content": "Count."}],
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            },
        }
        threads = [threading.Thread(target=run, args=kv, daemon=True) for kv in jobs.items()]
        for t in threads:
            t.start()
        started.wait(60)  # every stream has produced tokens
        os.kill(sched[0].pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
        for path in jobs:
            assert not isinstance(results[path], BaseException), results[path]
            err = assert_error_end(results[path], 503)
            assert "scheduler" in err["message"], err
        r = httpx.post(s.url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}, timeout=10)
        assert r.status_code == 503 and "scheduler" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
    finally:
        s.stop()
