"""Shared pieces of the PD fault tests: real `pdserve serve` prefill/decode servers (tcp
backend) with short timeouts set through the environment, requests as the router sends them,
and cleanliness checks. The fixtures (conftest.py) share one set of servers across the
package: starting one costs several seconds on CPU; every request uses its own bootstrap_room.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from pdserve.launch.cli import wait_healthy
from tests.conftest import free_port

BOOTSTRAP_TIMEOUT = 3.0  # prefill waiting for decode's page indices
WAITING_TIMEOUT = 4.0  # decode waiting for the KV after sending its indices
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_MAX_FAILURE = 2
MARGIN = 4.0  # scheduling slack on a small shared CPU box

ENV = {
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": str(BOOTSTRAP_TIMEOUT),
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": str(WAITING_TIMEOUT),
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": str(HEARTBEAT_MAX_FAILURE),
}

PROMPTS = ["The capital of France is", "def add(a, b):"]
SP = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}  # always 12 tokens to compare
# Prefill runs chunks of PREFILL_CHUNK tokens and answers /get_load between them, so a prompt of
# five chunks is seen mid-prefill and can be aborted before its last chunk; the whole prefill
# stays well inside decode's WAITING_TIMEOUT even on a busy 2-core box (1500 tokens in chunks of
# 512 took 3-4 s idle and more than WAITING_TIMEOUT under load: CI 2026-12-02)
PREFILL_CHUNK = 128
LONG_IDS = [100 + (i * 7919) % 40000 for i in range(5 * PREFILL_CHUNK - 1)]
LONG_SP = {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True}

# wire format of the tcp backend (pdserve/disagg/transfer/wire.py)
HEADER = struct.Struct("<4sBBHQIIHHIQ")
MAGIC, VERSION = b"PDKV", 1
REGISTER, DATA, META, ABORT, WRITE_BEGIN = 1, 2, 3, 4, 6
# SmolLM2-135M, float32, page size 16: bytes of one KV head's share of one page
HEAD_PAGE_BYTES = 30 * 2 * 16 * 64 * 4  # layers x (k, v) x page_size x head_dim x 4 bytes

_rooms = itertools.count(random.randrange(1 << 40, 1 << 41))


def new_room() -> int:
    return next(_rooms)


class Server:
    """`pdserve serve` in its own process group, with an environment and a log file."""

    def __init__(self, *extra: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pdserve-faults-", suffix=".log", delete=False)
        cmd = [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-total-tokens",
            "4096",
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd, start_new_session=True, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_healthy(self, timeout: float = 180) -> None:
        try:
            wait_healthy(self.url, self.proc, time.time() + timeout)
        except RuntimeError as e:
            self.kill()
            raise RuntimeError(f"{e}:\n{self.log_text()[-3000:]}") from None

    def log_text(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def load(self) -> dict:
        return httpx.get(self.url + "/get_load", timeout=10).json()

    def wait_clean(self, timeout: float = 10) -> dict:
        """Polls until nothing holds pages and every queue is empty (aborts are asynchronous)."""
        queues = (
            "num_running_reqs",
            "num_waiting_reqs",
            "prealloc_queue_len",
            "transfer_queue_len",
            "bootstrap_queue_len",
            "inflight_queue_len",
        )
        deadline = time.time() + timeout
        while True:
            ld = self.load()
            clean = ld["num_used_pages"] == 0 and all(ld.get(k, 0) == 0 for k in queues)
            if clean or time.time() > deadline:
                assert clean, (self.url, ld)
                return ld
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        self.log.close()
        os.unlink(self.log.name)


class Prefill(Server):
    def __init__(self, bootstrap_port: int | None = None) -> None:
        self.bootstrap_port = bootstrap_port or free_port()
        super().__init__(
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-transfer-backend",
            "tcp",
            "--disaggregation-bootstrap-port",
            str(self.bootstrap_port),
            "--chunked-prefill-size",
            str(PREFILL_CHUNK),
            env=ENV,
        )

    def route(self) -> dict:
        """This prefill rank's registration (its control endpoint) from the bootstrap server."""
        r = httpx.get(f"http://127.0.0.1:{self.bootstrap_port}/route?engine_rank=0", timeout=5)
        assert r.status_code == 200, r.text
        return r.json()


class Decode(Server):
    def __init__(self, **env: str) -> None:
        """`env` overrides this package's environment (e.g. a longer waiting timeout)."""
        super().__init__(
            "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "tcp", env={**ENV, **env}
        )

    def data_port(self) -> int:
        """The KV data endpoint prefill pushes into (only the scheduler's log names it)."""
        m = re.search(r"tcp KV manager \(decode, rank 0/1\) listening on 127\.0\.0\.1:(\d+)", self.log_text())
        assert m, "decode did not log its KV data endpoint"
        return int(m.group(1))


def body(prefill: Prefill, prompt: str, sp: dict, room: int | None = None, stream: bool = False) -> dict:
    return {
        "text": prompt,
        "sampling_params": sp,
        "stream": stream,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": prefill.bootstrap_port,
        "bootstrap_room": new_room() if room is None else room,
    }


def pd_generate(prefill: Prefill, decode: Decode, prompt: str, sp: dict = SP) -> dict:
    """What the router does: the same body to both servers at once; decode's answer counts."""
    b = body(prefill, prompt, sp)
    res: dict = {}

    def post(name: str, url: str) -> None:
        res[name] = httpx.post(url + "/generate", json=b, timeout=120)

    threads = [threading.Thread(target=post, args=(n, s.url)) for n, s in (("p", prefill), ("d", decode))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert res["p"].status_code == 200, res["p"].text
    assert res["d"].status_code == 200, res["d"].text
    return res["d"].json()


def error_message(r: httpx.Response) -> str:
    """The error text of a failed request: OpenAI's `error.message`, or, on the native
    /generate route, the abort message in meta_info.finish_reason."""
    data = r.json()
    if isinstance(data.get("error"), dict):
        return data["error"]["message"]
    fr = data["meta_info"]["finish_reason"]
    assert fr["type"] == "abort", data
    return fr["message"]


def timed_post(url: str, b: dict, timeout: float = 60) -> tuple[httpx.Response, float]:
    t0 = time.time()
    r = httpx.post(url + "/generate", json=b, timeout=timeout)
    return r, time.time() - t0


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class Background:
    """A request running in a thread; `.result` is (response, seconds) once done."""

    def __init__(self, url: str, b: dict) -> None:
        self.result: tuple | None = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(url, b), daemon=True)
        self._t.start()

    def _run(self, url: str, b: dict) -> None:
        try:
            self.result = timed_post(url, b)
        except BaseException as e:  # noqa: BLE001 - reported by join()
            self.error = e

    def join(self, timeout: float) -> tuple[httpx.Response, float]:
        self._t.join(timeout)
        assert not self._t.is_alive(), f"no answer within {timeout:.1f}s"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def assert_pair_healthy(pair, reference) -> None:
    """Both servers are clean and still produce the reference outputs."""
    p, d = pair
    p.wait_clean()
    d.wait_clean()
    for prompt, ref in zip(PROMPTS, reference):
        out = pd_generate(p, d, prompt)
        assert out["output_ids"] == ref["output_ids"] and out["text"] == ref["text"]
    p.wait_clean()
    d.wait_clean()


def open_stream(server: Server, b: dict) -> socket.socket:
    """POST a streaming /generate on a raw socket (closing it is an unambiguous disconnect)."""
    data = json.dumps(b).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    return sock


def read_events(sock: socket.socket, n: int, timeout: float = 60) -> list[dict]:
    """Reads until n SSE events carrying tokens arrived; returns them."""
    buf, events = b"", []
    deadline = time.time() + timeout
    while len(events) < n:
        assert time.time() < deadline, f"only {len(events)} events: {buf[-500:]!r}"
        chunk = sock.recv(65536)
        assert chunk, f"server closed the stream: {buf[-500:]!r}"
        buf += chunk
        for m in re.finditer(rb"data: (\{.*?\})\r?\n", buf):
            ev = json.loads(m.group(1))
            assert (ev["meta_info"].get("finish_reason") or {}).get("type") != "abort", ev
        events = [json.loads(m.group(1)) for m in re.finditer(rb"data: (\{.*?\})\r?\n", buf)]
        events = [e for e in events if e["output_ids"]]
    return events


def read_until_end(sock: socket.socket, timeout: float) -> list[dict]:
    """Every SSE event of a stream up to its `data: [DONE]` or its end (the chunked
    body's last chunk): a failed stream ends with an error event and no [DONE]."""
    buf = b""
    deadline = time.time() + timeout
    sock.settimeout(timeout)
    while b"data: [DONE]" not in buf and not buf.endswith(b"\r\n0\r\n\r\n"):
        assert time.time() < deadline, buf[-500:]
        chunk = sock.recv(65536)
        assert chunk, f"server closed the stream: {buf[-500:]!r}"
        buf += chunk
    return [json.loads(m.group(1)) for m in re.finditer(rb"data: (\{.*?\})\r?\n", buf)]
