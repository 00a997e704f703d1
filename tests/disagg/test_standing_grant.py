"""Standing write grants (shm, nixl, mooncake, and gloo since session 7): decode grants the write of a request's pages with
its REGISTER, so prefill writes without a WRITE_BEGIN -> ACK round trip per piece (#14). The
pages stay decode's: a failed or aborted receiver reports Failed (and is no longer `busy`) only
once prefill said that none of its writes is under way or can start, or its heartbeats failed,
or, for a live prefill that never answers, after the I/O timeout."""

import logging
import socket
import threading
import time

import pytest
import torch

from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer import one_sided, prefill_service, shm, wire
from pdserve.disagg.transfer.wire import FrameHeader, FrameType
from tests.disagg.helpers import ENGINE_BACKENDS, SHAPE, Pair, poll_until, wait_for

pytestmark = pytest.mark.flaky(reruns=2, reruns_delay=1)

DONE = {KVPoll.Success, KVPoll.Failed}


def _registered(pair, room, dst):
    r, s = pair.receiver(room), pair.sender(room)
    r.init(dst)
    assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    assert wait_for(r.registered.is_set)
    return r, s


@pytest.mark.parametrize("backend", ["shm", *ENGINE_BACKENDS])
def test_writes_need_no_grant_round_trip(backend, monkeypatch):
    replies = []
    real_reply = one_sided.OneSidedDecodeMover._reply
    monkeypatch.setattr(
        one_sided.OneSidedDecodeMover, "_reply", lambda self, *a: (replies.append(a), real_reply(self, *a))[1]
    )
    pair = Pair(backend)
    try:
        src, dst = [9, 10, 11, 3, 40], [30, 29, 28, 2, 50]
        r, s = _registered(pair, 5, dst)
        assert r.busy  # the standing grant: prefill may write from now on
        s.init(len(src))
        s.send(src[:2])
        s.send(src[2:], KVMetadata(5, 7))
        assert poll_until(r, DONE) == KVPoll.Success, r.failure_reason
        assert torch.equal(pair.dkv[dst], pair.pkv[src])
        assert not r.busy and replies == []  # no WRITE_BEGIN was answered
        assert poll_until(s, DONE) == KVPoll.Success
        assert pair.decode.decode._granted == {}
    finally:
        pair.close()


@pytest.fixture
def held_write(monkeypatch):
    """shm writes that wait for `go` once they have started (`started` is set)."""
    started, go = threading.Event(), threading.Event()
    real_write = shm.ShmPrefillMover.write

    def write(self, job, dst_pages, link):
        started.set()
        assert go.wait(10)
        real_write(self, job, dst_pages, link)

    monkeypatch.setattr(shm.ShmPrefillMover, "write", write)
    yield started, go
    go.set()


@pytest.mark.parametrize("who", ["decode", "prefill"])
def test_an_abort_frees_the_pages_only_after_the_write_under_way(who, held_write):
    started, go = held_write
    pair = Pair("shm")
    try:
        r, s = _registered(pair, 6, [4, 5])
        s.init(2)
        s.send([1, 2], KVMetadata(6, 1))
        assert started.wait(5)
        (r if who == "decode" else s).abort()
        assert poll_until(s, DONE) == KVPoll.Failed
        time.sleep(0.3)  # prefill knows; its write is still under way
        assert r.busy and r.poll() != KVPoll.Failed
        go.set()
        assert poll_until(r, DONE) == KVPoll.Failed and not r.busy
        assert "aborted by the " + ("decode" if who == "decode" else "prefill") in r.failure_reason
        assert pair.decode.decode._granted == {}
    finally:
        pair.close()


def test_a_prefill_that_never_answers_the_abort_holds_the_pages_for_the_io_timeout(monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(prefill_service.PrefillTransferService, "_on_decode_abort", lambda self, room, reason: None)
    pair = Pair("shm", io_timeout=1.5)
    try:
        r, s = _registered(pair, 7, [4])
        t0 = time.monotonic()
        r.abort()
        time.sleep(0.5)
        assert r.busy and r.poll() != KVPoll.Failed
        assert wait_for(lambda: not r.busy, 5)
        assert time.monotonic() - t0 >= 1.5 and r.poll() == KVPoll.Failed
        assert "no release from prefill within 1.5s" in caplog.text
    finally:
        pair.close()


def test_a_refused_registration_holds_nothing(monkeypatch):
    monkeypatch.setattr(shm.ShmPrefillMover, "check_registration", lambda self, body, pages: "no thanks")
    pair = Pair("shm")
    try:
        r = pair.receiver(8)
        r.init([4])
        assert poll_until(r, DONE) == KVPoll.Failed and "no thanks" in r.failure_reason and not r.busy
    finally:
        pair.close()


def test_a_dead_prefill_releases_its_grants():
    pair = Pair("shm")
    try:
        r, _ = _registered(pair, 9, [4])
        pair.prefill.shutdown()  # its release never goes out ...
        pair.bs.close()  # ... and its heartbeats fail
        assert poll_until(r, DONE) == KVPoll.Failed and not r.busy
        assert "heartbeats failed" in r.failure_reason
    finally:
        pair.close()


def _closed_by_peer(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_write_granted_frames_are_checked(caplog):
    caplog.set_level(logging.WARNING)
    pair = Pair("shm")
    nheads = SHAPE[4]
    try:
        r, s = _registered(pair, 10, [4])
        port = pair.decode.port
        # from a prefill rank that holds no grant for the room: the connection is closed
        c = socket.create_connection(("127.0.0.1", port), timeout=3)
        wire.send_frame(c, FrameHeader(FrameType.WRITE_GRANTED, 10, src_rank=1, npages=1, head_end=nheads))
        assert _closed_by_peer(c)
        # pages beyond the request: closed, and the receiver fails (once its grant is released)
        c = socket.create_connection(("127.0.0.1", port), timeout=3)
        wire.send_frame(c, FrameHeader(FrameType.WRITE_GRANTED, 10, offset=1, npages=1, head_end=nheads))
        assert _closed_by_peer(c)
        assert poll_until(r, DONE) == KVPoll.Failed and "outside the request" in r.failure_reason
        # a room holding no grant: ignored (no reply), the connection stays
        c = socket.create_connection(("127.0.0.1", port), timeout=3)
        wire.send_frame(c, FrameHeader(FrameType.WRITE_GRANTED, 4242, npages=1, head_end=nheads))
        wire.send_frame(c, FrameHeader(FrameType.WRITE_DONE, 4242, npages=1, head_end=nheads))
        c.settimeout(0.3)
        with pytest.raises(socket.timeout):
            c.recv(1)
        c.close()
        assert "holds no standing grant, ignored" in caplog.text
        r2, s2 = _registered(pair, 11, [7])
        s2.init(1)
        s2.send([3], KVMetadata(11, 1))
        assert poll_until(r2, DONE) == KVPoll.Success
        assert torch.equal(pair.dkv[7], pair.pkv[3])
    finally:
        pair.close()


def test_gloo_writes_under_the_standing_grant_and_drops_unwanted_bytes(monkeypatch):
    """gloo (two-sided) writes under the standing grant too, without a round trip; a write
    into a receiver that failed meanwhile is still received (prefill's send completes, the
    connection's group stays in step) but not scattered into its pages."""
    replies = []
    real_reply = one_sided.OneSidedDecodeMover._reply
    monkeypatch.setattr(
        one_sided.OneSidedDecodeMover, "_reply", lambda self, *a: (replies.append(a), real_reply(self, *a))[1]
    )
    pair = Pair("gloo")
    try:
        r, s = _registered(pair, 12, [4])
        assert r.busy  # the standing grant
        s.init(1)
        s.send([3], KVMetadata(12, 1))
        assert poll_until(r, DONE) == KVPoll.Success and replies == []
        assert torch.equal(pair.dkv[4], pair.pkv[3])
        # a receiver that failed before the write: the bytes are received and dropped
        before = pair.dkv.clone()
        r2, s2 = _registered(pair, 14, [6, 7])
        with pair.decode.decode.lock:
            r2.fail("gave up", notify=False)  # prefill does not hear of it
        s2.init(2)
        s2.send([8, 9], KVMetadata(14, 1))
        assert poll_until(s2, DONE) == KVPoll.Success  # its send completed
        assert poll_until(r2, DONE) == KVPoll.Failed and not r2.busy  # its source finished
        assert torch.equal(pair.dkv, before)  # nothing landed
        r3, s3 = _registered(pair, 15, [9])  # the connection and its group work on
        s3.init(1)
        s3.send([5], KVMetadata(15, 1))
        assert poll_until(r3, DONE) == KVPoll.Success and torch.equal(pair.dkv[9], pair.pkv[5])
    finally:
        pair.close()


def test_a_grant_ends_when_its_source_finished_even_after_the_receiver_failed(held_write, monkeypatch):
    """decode gave up while prefill's last write was under way, and prefill (done by then)
    never answers the abort: the write's WRITE_DONE and META end the grant, not the I/O
    timeout."""
    started, go = held_write
    monkeypatch.setattr(prefill_service.PrefillTransferService, "_on_decode_abort", lambda self, room, reason: None)
    pair = Pair("shm", io_timeout=30.0)
    try:
        r, s = _registered(pair, 13, [4, 5])
        s.init(2)
        s.send([1, 2], KVMetadata(13, 1))
        assert started.wait(5)
        r.abort()
        time.sleep(0.2)
        assert r.busy
        t0 = time.monotonic()
        go.set()
        assert poll_until(r, DONE) == KVPoll.Failed and not r.busy
        assert time.monotonic() - t0 < 5 and "aborted by the decode" in r.failure_reason
        assert poll_until(s, DONE) == KVPoll.Success  # prefill did its part
    finally:
        pair.close()
