"""Timeouts and malformed frames: each is rejected and logged, and the manager keeps serving."""

import logging
import socket
import time

import msgspec
import numpy as np
import pytest
import torch

from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.wire import FrameHeader, FrameType
from tests.disagg.helpers import ENGINE_BACKENDS, SHAPE, Pair, poll_until


# Timing-sensitive (1-4 s protocol timeouts, threads of five backends in one process): on the
# 2-core CI box one of ~120 cases fails now and then in a full-suite run and passes alone.
# Reruns keep CI meaningful meanwhile; the cause is open (see docs/kv_transfer.md, "Tests").
pytestmark = pytest.mark.flaky(reruns=2, reruns_delay=1)

DONE = {KVPoll.Success, KVPoll.Failed}


@pytest.fixture(params=["tcp", "shm", "gloo", *ENGINE_BACKENDS])
def pair(request):
    p = Pair(request.param)
    yield p
    p.close()


@pytest.fixture
def tcp_pair():
    p = Pair("tcp")
    yield p
    p.close()


def good_transfer(pair, room, src=(1, 2, 3), dst=(7, 8, 9)):
    r, s = pair.receiver(room), pair.sender(room)
    r.init(list(dst))
    assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    s.init(len(src))
    s.send(list(src), KVMetadata(room, 1))
    assert poll_until(r, DONE) == KVPoll.Success, r.failure_reason
    assert torch.equal(pair.dkv[list(dst)], pair.pkv[list(src)])
    return r


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    return s


def closed_by_peer(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_bootstrap_timeout_fails_sender(pair):
    s = pair.sender(99)  # decode never registers this room
    t0 = time.monotonic()
    assert poll_until(s, DONE, 8) == KVPoll.Failed
    elapsed = time.monotonic() - t0
    assert 2.9 <= elapsed < 3.8  # bootstrap_timeout = 3 s
    assert "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT" in s.failure_reason
    assert pair.prefill.stats().transfers_failed == 1
    good_transfer(pair, 100)


def test_waiting_timeout_fails_receiver(pair):
    r = pair.receiver(98)  # prefill never creates a sender for it
    assert poll_until(r, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    r.init([4, 5])
    t0 = time.monotonic()
    assert poll_until(r, DONE, 8) == KVPoll.Failed
    assert 3.9 <= time.monotonic() - t0 < 4.8  # waiting_timeout = 4 s
    assert "SGLANG_DISAGGREGATION_WAITING_TIMEOUT" in r.failure_reason
    good_transfer(pair, 101)


def test_decode_rejects_malformed_data_frames(tcp_pair, caplog):
    pair = tcp_pair
    caplog.set_level(logging.WARNING)
    port = pair.decode.port
    pn = pair.prefill.args.page_nbytes
    nheads = SHAPE[4]

    # bad magic: closed
    c = connect(port)
    c.sendall(b"XXXX" + bytes(36))
    assert closed_by_peer(c)
    assert "bad magic" in caplog.text

    # absurd lengths: page count beyond the pool, body over the limit, payload not matching the pages
    for h in (
        FrameHeader(FrameType.DATA, 1, npages=1 << 31, head_end=nheads, payload_len=1 << 62),
        FrameHeader(FrameType.DATA, 1, npages=1, head_end=nheads, body_len=1 << 30),
        FrameHeader(FrameType.DATA, 1, npages=1, head_end=nheads, payload_len=pn + 1),
        FrameHeader(FrameType.DATA, 1, npages=1, head_end=nheads + 3, payload_len=pn),
        FrameHeader(FrameType.REGISTER, 1),
    ):
        c = connect(port)
        c.sendall(h.pack())
        assert closed_by_peer(c)
    assert "exceeds" in caplog.text and "outside the" in caplog.text and "payload" in caplog.text

    # a live room: out-of-range page offset -> that room fails, the connection closes
    r, s = pair.receiver(5), pair.sender(5)
    r.init([10, 11])
    assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    c = connect(port)
    c.sendall(FrameHeader(FrameType.DATA, 5, offset=1, npages=2, head_end=nheads, payload_len=2 * pn).pack())
    assert closed_by_peer(c)
    assert poll_until(r, DONE) == KVPoll.Failed and "outside the request's 2 pages" in r.failure_reason
    assert pair.dkv[[10, 11]].abs().sum() == 0  # nothing was written

    # unknown room: well-formed, drained and logged; the connection stays usable
    c = connect(port)
    wire.send_frame(c, FrameHeader(FrameType.DATA, 424242, npages=1, head_end=nheads), payload=[bytes(pn)])
    wire.send_frame(c, FrameHeader(FrameType.META, 424242), payload=[KVMetadata(424242, 1).pack()])
    c.settimeout(0.3)
    assert not closed_by_peer(c)
    c.settimeout(3)
    assert "unknown or finished room 424242" in caplog.text

    # wrong room inside the metadata record -> that receiver fails, logged
    r2, s2 = pair.receiver(6), pair.sender(6)
    r2.init([12])
    assert poll_until(s2, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    wire.send_frame(c, FrameHeader(FrameType.META, 6), payload=[KVMetadata(7, 1).pack()])
    assert poll_until(r2, DONE) == KVPoll.Failed and "room 7, expected room 6" in r2.failure_reason
    assert "metadata room mismatch" in caplog.text
    c.close()

    good_transfer(pair, 200)  # the manager still serves


def test_prefill_rejects_malformed_registrations(pair, caplog):
    caplog.set_level(logging.WARNING)
    port = pair.prefill.port
    d = pair.decode
    good = wire.RegisterBody(
        decode_rank=0,
        decode_tp_size=1,
        host="127.0.0.1",
        port=d.port,
        backend=pair.backend,
        page_size=SHAPE[3],
        num_layers=SHAPE[1],
        total_kv_heads=SHAPE[4],
        head_dim=SHAPE[5],
        dtype="bfloat16",
        decode_num_pages=SHAPE[0],
        shm_name=d.args.shm_name,
    )
    pages = np.array([1, 2], dtype="<u4").tobytes()

    def send_register(body: bytes, npages=2, payload=pages, room=1):
        c = connect(port)
        wire.send_frame(c, FrameHeader(FrameType.REGISTER, room, npages=npages), body, [payload])
        return c

    # framing violations close the connection
    for c in (
        send_register(wire.encode_body(good), npages=0, payload=b""),
        send_register(wire.encode_body(good), npages=(1 << 22) + 1, payload=b""),
        send_register(wire.encode_body(good), npages=3),  # payload is only 2 pages
        send_register(b"\xc1garbage"),
        send_register(msgspec.msgpack.encode({**msgspec.structs.asdict(good), "evil": 1})),
        send_register(msgspec.msgpack.encode({**msgspec.structs.asdict(good), "port": 0})),
    ):
        assert closed_by_peer(c)
    assert "REGISTER for 0 pages" in caplog.text and "bad REGISTER body" in caplog.text

    # well-formed but wrong: refused with a reason, the connection stays up
    def refused(body, payload=pages):
        c = send_register(wire.encode_body(body), payload=payload)
        ack = wire.read_ack(c, 1)
        c.close()
        assert not ack.ok
        return ack.error

    assert "page_size" in refused(msgspec.structs.replace(good, page_size=8))
    assert "outside decode's pool" in refused(good, np.array([1, SHAPE[0]], dtype="<u4").tobytes())
    assert "duplicate" in refused(good, np.array([3, 3], dtype="<u4").tobytes())
    assert "backend" in refused(msgspec.structs.replace(good, backend="nixl"))
    if pair.backend == "shm":
        assert "not found" in refused(msgspec.structs.replace(good, shm_name="pdserve-kv-1-deadbeef"))
        assert "must look like" in refused(msgspec.structs.replace(good, shm_name="../../etc/passwd"))
        assert "bytes" in refused(
            msgspec.structs.replace(good, decode_num_pages=SHAPE[0] - 1), np.array([1, 2], dtype="<u4").tobytes()
        )
    assert "refused decode rank 0's registration" in caplog.text

    good_transfer(pair, 300)


def test_shm_write_protocol_violations(caplog):
    pair = Pair("shm")
    caplog.set_level(logging.WARNING)
    try:
        port, nheads = pair.decode.port, SHAPE[4]
        c = connect(port)  # WRITE_DONE without a grant
        wire.send_frame(c, FrameHeader(FrameType.WRITE_DONE, 1, npages=1, head_end=nheads))
        assert closed_by_peer(c)
        c = connect(port)  # DATA is not an shm frame
        wire.send_frame(c, FrameHeader(FrameType.DATA, 1, npages=1, head_end=nheads))
        assert closed_by_peer(c)
        c = connect(port)  # unknown room: refused, connection kept
        wire.send_frame(c, FrameHeader(FrameType.WRITE_BEGIN, 77, npages=1, head_end=nheads))
        ack = wire.read_ack(c, 77)
        assert not ack.ok and "unknown" in ack.error
        c.close()
        assert "WITHOUT a matching".lower() in caplog.text.lower()
        good_transfer(pair, 400)
    finally:
        pair.close()


def test_granted_write_blocks_failure_until_done(caplog):
    """shm: a receiver that times out while prefill holds a write grant reports Failed only after the
    write ends (here: the writer disconnects), so its pages are never freed under a writer."""
    pair = Pair("shm", waiting_timeout=0.5)
    try:
        r, s = pair.receiver(8), pair.sender(8)
        r.init([3])
        assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
        c = connect(pair.decode.port)
        wire.send_frame(c, FrameHeader(FrameType.WRITE_BEGIN, 8, npages=1, head_end=SHAPE[4]))
        assert wire.read_ack(c, 8).ok
        time.sleep(0.7)
        assert r.poll() == KVPoll.Transferring  # timed out, but a writer still holds the pages
        c.close()
        assert poll_until(r, DONE) == KVPoll.Failed and "WAITING_TIMEOUT" in r.failure_reason
    finally:
        pair.close()
