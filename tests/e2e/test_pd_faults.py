"""PD fault handling end to end: real `pdserve serve` prefill/decode servers (tcp backend),
short timeouts set through the environment, faults injected from the outside.

Every fault must end the affected request with an HTTP error whose message names the cause,
within the configured timeout; afterwards both servers hold no pages, their PD queues are
empty, and a normal PD request still gives the same output as before the faults.

The servers are shared by the module (starting one costs several seconds on CPU); every
request uses its own bootstrap_room.
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
import pytest

from pdserve.launch.cli import wait_healthy
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

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
LONG_IDS = [100 + (i * 7919) % 40000 for i in range(1500)]  # prefill takes seconds (3 chunks) on CPU
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
        cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(self.port), "--dtype", "float32",
               "--max-total-tokens", "4096", *extra]
        self.proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **env},
                                     stdout=self.log, stderr=subprocess.STDOUT)

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
        queues = ("num_running_reqs", "num_waiting_reqs", "prealloc_queue_len", "transfer_queue_len",
                  "bootstrap_queue_len", "inflight_queue_len")
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
        super().__init__("--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "tcp",
                         "--disaggregation-bootstrap-port", str(self.bootstrap_port), env=ENV)

    def route(self) -> dict:
        """This prefill rank's registration (its control endpoint) from the bootstrap server."""
        r = httpx.get(f"http://127.0.0.1:{self.bootstrap_port}/route?engine_rank=0", timeout=5)
        assert r.status_code == 200, r.text
        return r.json()


class Decode(Server):
    def __init__(self) -> None:
        super().__init__("--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "tcp", env=ENV)

    def data_port(self) -> int:
        """The KV data endpoint prefill pushes into (only the scheduler's log names it)."""
        m = re.search(r"tcp KV manager \(decode, rank 0/1\) listening on 127\.0\.0\.1:(\d+)", self.log_text())
        assert m, "decode did not log its KV data endpoint"
        return int(m.group(1))


@pytest.fixture(scope="module")
def cluster():
    """The shared pair (prefill, decode), and a prefill and a decode that tests kill."""
    servers = [Prefill(), Decode(), Prefill(), Decode()]
    try:
        for s in servers:
            s.wait_healthy()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def pair(cluster):
    return cluster[0], cluster[1]


def body(prefill: Prefill, prompt: str, sp: dict, room: int | None = None, stream: bool = False) -> dict:
    return {"text": prompt, "sampling_params": sp, "stream": stream, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": prefill.bootstrap_port, "bootstrap_room": new_room() if room is None else room}


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


@pytest.fixture(scope="module")
def reference(pair):
    """Outputs of healthy PD requests on the shared pair, before any fault."""
    p, d = pair
    refs = [pd_generate(p, d, prompt) for prompt in PROMPTS]
    for ref in refs:
        assert len(ref["output_ids"]) == SP["max_new_tokens"], ref
        assert ref["meta_info"]["transfer_time"] is not None
    p.wait_clean()
    d.wait_clean()
    return refs


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


# -- 1 ------------------------------------------------------------------------------------
def test_prefill_killed_mid_request(cluster, pair, reference):
    """Decode registered a room with a prefill that then dies: the heartbeat fails the request;
    traffic through another prefill goes on, and a prefill restarted on the dead one's
    bootstrap port is used again."""
    p, d, victim, _ = cluster
    failed_before = d.load()["num_failed_transfers"]
    bg = Background(d.url, body(victim, PROMPTS[0], SP))
    # decode found the prefill, preallocated pages and sent its indices: it now waits for KV
    wait_for(lambda: d.load()["transfer_queue_len"] == 1, 10, "decode to wait for the KV")
    assert d.load()["num_used_pages"] > 0
    time.sleep(0.3)  # the REGISTER frame reaches the victim (localhost: well under a millisecond)
    victim.kill(signal.SIGKILL)
    t_kill = time.time()
    other: dict = {}
    normal = threading.Thread(target=lambda: other.update(out=pd_generate(p, d, PROMPTS[1])))
    normal.start()  # meanwhile, the same decode serves a request through the live prefill
    limit = HEARTBEAT_INTERVAL * HEARTBEAT_MAX_FAILURE + MARGIN
    r, _ = bg.join(limit + 5)
    took = time.time() - t_kill
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "heartbeat" in msg and "KV transfer" in msg, msg
    assert took < limit, f"decode answered {took:.1f}s after the kill (limit {limit:.1f}s): {msg}"
    # the waiting timeout would also have failed it, but only WAITING_TIMEOUT after init
    assert took < WAITING_TIMEOUT
    reborn = Prefill(victim.bootstrap_port)  # loads while the rest is checked
    try:
        normal.join(60)
        assert other["out"]["output_ids"] == reference[1]["output_ids"]
        ld = d.wait_clean()
        assert ld["num_failed_transfers"] == failed_before + 1
        assert httpx.get(d.url + "/health", timeout=5).status_code == 200
        assert_pair_healthy(pair, reference)
        # decode looks the new prefill up afresh (new transfer endpoint) and uses it
        reborn.wait_healthy()
        for prompt, ref in zip(PROMPTS, reference):
            assert pd_generate(reborn, d, prompt)["output_ids"] == ref["output_ids"]
        reborn.wait_clean()
        d.wait_clean()
    finally:
        reborn.stop()


def test_decode_killed_after_sending_indices(cluster, pair, reference):
    """Decode registers a room, then dies before the KV comes: prefill still runs the prompt,
    cannot deliver it, and answers its client with the transfer error, freeing its pages."""
    p, d, _, victim = cluster
    b = body(p, PROMPTS[0], SP)
    Background(victim.url, b)  # its answer never comes: the server dies
    wait_for(lambda: victim.load()["transfer_queue_len"] == 1, 10, "decode to send its indices")
    time.sleep(0.3)  # the REGISTER frame reaches prefill
    victim.kill(signal.SIGKILL)
    r, took = timed_post(p.url, b, timeout=BOOTSTRAP_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "KV transfer" in msg and "sending KV to decode" in msg, msg
    assert took < BOOTSTRAP_TIMEOUT, took
    assert_pair_healthy(pair, reference)


# -- 2 ------------------------------------------------------------------------------------
def test_decode_never_sends_indices(pair, reference):
    """Only prefill gets the request: its sender times out waiting for decode's indices."""
    p, d = pair
    r, took = timed_post(p.url, body(p, PROMPTS[0], SP), timeout=BOOTSTRAP_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "KV transfer" in msg and "page indices" in msg and "BOOTSTRAP_TIMEOUT" in msg, msg
    assert BOOTSTRAP_TIMEOUT - 0.5 <= took < BOOTSTRAP_TIMEOUT + MARGIN, took
    assert_pair_healthy(pair, reference)


# -- 3 ------------------------------------------------------------------------------------
def test_decode_waiting_timeout(pair, reference):
    """Only decode gets the request (prefill alive, never asked): decode gives up. A streamed
    request fails the same way (its status is already 200: the error is the last event)."""
    p, d = pair
    failed_before = d.load()["num_failed_transfers"]
    limit = max(BOOTSTRAP_TIMEOUT, WAITING_TIMEOUT) + MARGIN
    sock = open_stream(d, body(p, PROMPTS[1], SP, stream=True))
    try:
        r, took = timed_post(d.url, body(p, PROMPTS[0], SP), timeout=limit + 10)
        assert r.status_code >= 500, r.text
        msg = error_message(r)
        assert "KV transfer" in msg and "WAITING_TIMEOUT" in msg, msg
        assert took < limit, took
        last = read_until_done(sock, timeout=limit)[-1]
    finally:
        sock.close()
    fr = last["meta_info"]["finish_reason"]
    assert fr["type"] == "abort" and "WAITING_TIMEOUT" in fr["message"] and last["output_ids"] == [], last
    assert d.wait_clean()["num_failed_transfers"] == failed_before + 2
    assert_pair_healthy(pair, reference)


def test_late_prefill_request_after_decode_gave_up(pair, reference):
    """Decode timed out and told prefill: prefill's request for that room fails at once
    (instead of waiting out its own bootstrap timeout) and frees everything."""
    p, d = pair
    b = body(p, PROMPTS[0], SP)
    r, _ = timed_post(d.url, b, timeout=WAITING_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 500, r.text
    time.sleep(0.3)  # the ABORT frame reaches prefill
    r, took = timed_post(p.url, b, timeout=BOOTSTRAP_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    # prefill reports decode's reason (here decode's waiting timeout), not its own timeout
    assert "KV transfer" in msg and "page indices" not in msg, msg
    assert took < BOOTSTRAP_TIMEOUT - 0.5, f"{took:.1f}s: prefill waited for its timeout ({msg})"
    assert_pair_healthy(pair, reference)


# -- 4 ------------------------------------------------------------------------------------
def open_stream(server: Server, b: dict) -> socket.socket:
    """POST a streaming /generate on a raw socket (closing it is an unambiguous disconnect)."""
    data = json.dumps(b).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
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


def read_until_done(sock: socket.socket, timeout: float) -> list[dict]:
    """Every SSE event of a stream up to its `data: [DONE]`."""
    buf = b""
    deadline = time.time() + timeout
    sock.settimeout(timeout)
    while b"data: [DONE]" not in buf:
        assert time.time() < deadline, buf[-500:]
        chunk = sock.recv(65536)
        assert chunk, f"server closed the stream: {buf[-500:]!r}"
        buf += chunk
    return [json.loads(m.group(1)) for m in re.finditer(rb"data: (\{.*?\})\r?\n", buf)]


def test_client_disconnect_while_decoding(pair, reference):
    """A long streamed generation whose client goes away: decode aborts it and frees its pages."""
    p, d = pair
    b = body(p, PROMPTS[1], LONG_SP, stream=True)
    pre = Background(p.url, {**b, "stream": False})
    sock = open_stream(d, b)
    try:
        events = read_events(sock, 3)
        assert len(events[-1]["output_ids"]) < LONG_SP["max_new_tokens"]
        r, _ = pre.join(30)
        assert r.status_code == 200, r.text  # prefill's part (the first token) is done
        assert d.load()["num_running_reqs"] == 1
    finally:
        sock.close()
    t0 = time.time()
    d.wait_clean(timeout=5)
    p.wait_clean(timeout=5)
    assert time.time() - t0 < 5
    gen_before = d.load()["generation_tokens"]
    time.sleep(0.5)
    assert d.load()["generation_tokens"] == gen_before, "decode kept generating after the abort"
    assert_pair_healthy(pair, reference)


def test_client_disconnect_while_waiting_for_kv(pair, reference):
    """The decode client goes away while decode waits for the KV: pages freed at once,
    prefill told (its late request for the room fails instead of waiting)."""
    p, d = pair
    b = body(p, PROMPTS[0], SP, stream=True)
    sock = open_stream(d, b)
    try:
        wait_for(lambda: d.load()["transfer_queue_len"] == 1, 10, "decode to wait for the KV")
    finally:
        sock.close()
    t0 = time.time()
    d.wait_clean(timeout=3)
    assert time.time() - t0 < WAITING_TIMEOUT - 1, "freed by the waiting timeout, not by the disconnect"
    time.sleep(0.3)
    r, took = timed_post(p.url, {**b, "stream": False}, timeout=BOOTSTRAP_TIMEOUT + MARGIN + 10)
    assert r.status_code >= 400, r.text
    msg = error_message(r)
    assert "abort" in msg.lower() and "page indices" not in msg, msg
    assert took < BOOTSTRAP_TIMEOUT - 0.5, f"{took:.1f}s: prefill waited for its timeout ({msg})"
    assert_pair_healthy(pair, reference)


def test_prefill_client_disconnect_during_prefill_tells_decode(pair, reference):
    """Prefill's client goes away while prefill computes a long prompt: prefill aborts the
    request and tells decode, which answers its client at once (not after WAITING_TIMEOUT)."""
    p, d = pair
    b = {"input_ids": LONG_IDS, "sampling_params": SP, "bootstrap_host": "127.0.0.1",
         "bootstrap_port": p.bootstrap_port, "bootstrap_room": new_room()}
    dec = Background(d.url, b)
    wait_for(lambda: d.load()["transfer_queue_len"] == 1, 10, "decode to wait for the KV")
    sock = open_stream(p, b)
    try:
        wait_for(lambda: p.load()["num_running_reqs"] == 1, 10, "prefill to start on the prompt", 0.02)
    finally:
        sock.close()
    t0 = time.time()
    r, _ = dec.join(WAITING_TIMEOUT + MARGIN)
    took = time.time() - t0
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "KV transfer" in msg and "prefill aborted" in msg, msg
    assert took < WAITING_TIMEOUT - 1, f"decode answered after {took:.1f}s: {msg}"
    assert_pair_healthy(pair, reference)


# -- 5 ------------------------------------------------------------------------------------
def header(ftype: int, room: int = 0, *, src: int = 0, offset: int = 0, npages: int = 0, h0: int = 0, h1: int = 0,
           body_len: int = 0, payload_len: int = 0, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, ftype, src, room, offset, npages, h0, h1, body_len, payload_len)


def send_raw(port: int, data: bytes, *, expect_close: bool) -> None:
    """Sends bytes to a transfer endpoint; with expect_close, the server must hang up (it
    rejected the frame) rather than leave the connection waiting."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if expect_close:
            s.settimeout(5)
            try:
                while s.recv(4096):  # an error ACK may come first
                    pass
            except ConnectionResetError:
                pass


def test_malformed_frames_to_prefill_control_endpoint(pair, reference):
    p, d = pair
    info = p.route()
    assert info["backend"] == "tcp" and info["rank_ip"] == "127.0.0.1"
    port = info["rank_port"]
    room = new_room()
    garbage = bytes(random.Random(0).getrandbits(8) for _ in range(4096))
    cases = [
        garbage,
        header(REGISTER, room, magic=b"XXXX"),
        header(REGISTER, room, version=99),
        header(99, room),
        header(REGISTER, room, npages=0),
        header(REGISTER, room, npages=1 << 30, payload_len=4 << 30),
        header(REGISTER, room, npages=2, payload_len=4),  # payload does not match the page count
        header(REGISTER, room, npages=1, body_len=5, payload_len=4) + b"\xff" * 9,  # body is not msgpack
        header(REGISTER, room, body_len=1 << 20),  # body over the limit
        header(DATA, room, npages=1, payload_len=16) + b"\0" * 16,  # a data frame on the control channel
        header(ABORT, room, payload_len=8),
    ]
    for data in cases:
        send_raw(port, data, expect_close=True)
    # a truncated header (the server waits for the rest), then the connection closes
    send_raw(port, header(REGISTER, room)[:17], expect_close=False)
    # an ABORT for a room nobody knows is ignored; the connection stays usable
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        ack = b"\x82\xa2ok\xc2\xa5error\xa4test"  # msgpack {"ok": False, "error": "test"}
        s.sendall(header(ABORT, new_room(), body_len=len(ack)) + ack)
    assert httpx.get(p.url + "/health", timeout=5).status_code == 200
    assert_pair_healthy(pair, reference)


def test_malformed_frames_to_decode_data_endpoint(pair, reference):
    p, d = pair
    port = d.data_port()
    room = new_room()
    garbage = bytes(random.Random(1).getrandbits(8) for _ in range(4096))
    cases = [
        (garbage, True),
        (header(DATA, room, magic=b"GET "), True),
        (header(DATA, room, version=0), True),
        (header(DATA, room, npages=0, h1=1), True),  # no pages
        (header(DATA, room, npages=1 << 30, h1=1, payload_len=1 << 40), True),  # more pages than the pool
        (header(DATA, room, npages=1, h0=0, h1=1000, payload_len=16), True),  # heads out of range
        (header(DATA, room, npages=1, h0=0, h1=1, payload_len=7), True),  # payload != pages x page bytes
        (header(META, room, payload_len=3) + b"abc", True),
        (header(WRITE_BEGIN, room, npages=1, h1=1), True),  # an shm frame on a tcp decode
        (header(REGISTER, room, npages=1, payload_len=4) + b"\0" * 4, True),  # a control frame
        (header(META, room)[:30], False),  # truncated header: we hang up first
        (header(DATA, room, npages=1, h1=1, payload_len=HEAD_PAGE_BYTES) + b"\0" * 100, False),  # cut short
    ]
    for data, expect_close in cases:
        send_raw(port, data, expect_close=expect_close)
    # well-formed frames for a room decode does not know are discarded; the connection stays up
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(header(DATA, room, npages=1, h1=1, payload_len=HEAD_PAGE_BYTES) + b"\0" * HEAD_PAGE_BYTES
                  + header(META, room, payload_len=32) + b"\0" * 32)
        s.settimeout(1)
        with pytest.raises(TimeoutError):
            s.recv(1)
    assert httpx.get(d.url + "/health", timeout=5).status_code == 200
    assert_pair_healthy(pair, reference)


def test_malformed_frame_for_a_live_room_fails_only_that_request(pair, reference):
    """A DATA frame that does not fit a request waiting for its KV fails that request at once
    (pages freed, error to the client); other traffic is unaffected."""
    p, d = pair
    port = d.data_port()
    failed_before = d.load()["num_failed_transfers"]
    b = body(p, PROMPTS[0], SP)
    bg = Background(d.url, b)
    wait_for(lambda: d.load()["transfer_queue_len"] == 1, 10, "decode to wait for the KV")
    time.sleep(0.2)
    # pages far outside the request's page list
    send_raw(port, header(DATA, b["bootstrap_room"], offset=1000, npages=1, h0=0, h1=3,
                          payload_len=3 * HEAD_PAGE_BYTES), expect_close=True)
    r, took = bg.join(WAITING_TIMEOUT + MARGIN)
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "malformed DATA frame" in msg, msg
    assert took < WAITING_TIMEOUT, f"failed by the waiting timeout ({took:.1f}s), not by the bad frame"
    assert d.wait_clean()["num_failed_transfers"] == failed_before + 1
    assert_pair_healthy(pair, reference)
