"""Malformed transfer frames sent to prefill's control endpoint and decode's data endpoint:
rejected and logged, nothing else breaks; a bad frame for a live room fails only that request.
"""

from __future__ import annotations

import random
import socket
import time

import httpx
import pytest

from tests.e2e.pd_faults.cluster import (
    ABORT,
    Background,
    DATA,
    HEADER,
    HEAD_PAGE_BYTES,
    MAGIC,
    MARGIN,
    META,
    PROMPTS,
    REGISTER,
    SP,
    VERSION,
    WAITING_TIMEOUT,
    WRITE_BEGIN,
    assert_pair_healthy,
    body,
    error_message,
    new_room,
    wait_for,
)

pytestmark = pytest.mark.e2e


# -- 5 ------------------------------------------------------------------------------------
def header(
    ftype: int,
    room: int = 0,
    *,
    src: int = 0,
    offset: int = 0,
    npages: int = 0,
    h0: int = 0,
    h1: int = 0,
    body_len: int = 0,
    payload_len: int = 0,
    magic: bytes = MAGIC,
    version: int = VERSION,
) -> bytes:
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
        s.sendall(
            header(DATA, room, npages=1, h1=1, payload_len=HEAD_PAGE_BYTES)
            + b"\0" * HEAD_PAGE_BYTES
            + header(META, room, payload_len=32)
            + b"\0" * 32
        )
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
    send_raw(
        port,
        header(DATA, b["bootstrap_room"], offset=1000, npages=1, h0=0, h1=3, payload_len=3 * HEAD_PAGE_BYTES),
        expect_close=True,
    )
    r, took = bg.join(WAITING_TIMEOUT + MARGIN)
    assert r.status_code >= 500, r.text
    msg = error_message(r)
    assert "malformed DATA frame" in msg, msg
    assert took < WAITING_TIMEOUT, f"failed by the waiting timeout ({took:.1f}s), not by the bad frame"
    assert d.wait_clean()["num_failed_transfers"] == failed_before + 1
    assert_pair_healthy(pair, reference)
