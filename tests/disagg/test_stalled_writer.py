"""A decode scheduler never waits on a KV write (issue #10): aborting a request whose pages a
prefill is writing mid-frame returns at once, and the pages are freed only once that write
ends. It used to wait for the writer on the scheduler's thread, up to the I/O timeout (60 s):
a prefill paused mid-frame (SIGSTOP in the soak) froze every decode on the server that long."""

import socket
import threading

import pytest

from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer import wire
from pdserve.disagg.transfer.wire import FrameHeader, FrameType
from pdserve.engine.request import ReqStatus
from tests.disagg.helpers import Pair, poll_until, wait_for
from tests.unit.test_disagg_queues import req, setup, step, used_pages


@pytest.fixture
def pair():
    p = Pair("tcp", io_timeout=60.0)
    yield p
    p.close()


def test_abort_returns_while_a_frame_is_half_written(pair):
    room, pages = 77, [4, 5, 6]
    r = pair.receiver(room)
    assert poll_until(r, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    r.init(pages)
    # a prefill that starts a DATA frame for the room and stops in the middle of it
    a = pair.decode.args
    h = FrameHeader(
        FrameType.DATA,
        room,
        src_rank=0,
        offset=0,
        npages=len(pages),
        head_start=0,
        head_end=a.num_kv_heads,
        payload_len=len(pages) * a.page_nbytes,
    )
    sock = socket.create_connection(("127.0.0.1", pair.decode.port))
    try:
        wire.send_views(sock, [h.pack(), b"\x01" * (a.page_nbytes // 2)])
        assert wait_for(lambda: r.busy, 5)
        t = threading.Thread(target=r.abort, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "abort() waited for the stalled writer"
        assert r.busy and r.poll() != KVPoll.Failed  # the pages are still being written: not free yet
    finally:
        sock.close()  # the writer's connection ends: its slot is released
    assert poll_until(r, {KVPoll.Failed}) == KVPoll.Failed
    assert not r.busy and "aborted by the decode scheduler" in r.failure_reason


def test_decode_frees_an_aborted_requests_pages_only_once_its_write_ends():
    s, d = setup(DisaggregationMode.DECODE)
    r = req("a", n=10)
    d.add(r)
    d.step()  # Bootstrapping -> WaitingForInput
    real_poll = r.kv_receiver.poll
    r.kv_receiver.poll = lambda: KVPoll.Transferring if r.kv_receiver._inited else real_poll()  # KV arriving
    d.step()  # pages preallocated, init()
    assert r.pages and d.transfer_queue.queue == [r]
    held = list(r.pages)
    busy = {"v": True}
    type(r.kv_receiver).busy = property(lambda self: busy["v"])  # a write into its pages under way
    try:
        assert d.abort("a")
        outs = {}
        step(s, d, outs)
        assert outs["a"][-1].finish.type == "abort" and r.status == ReqStatus.FINISHED_ABORT  # the client knows now
        assert r.pages == held and used_pages(s) == len(held) and d.has_work()  # pages not reused yet
        step(s, d, outs)
        assert r.pages == held
        busy["v"] = False  # the write ended
        step(s, d, outs)
        assert r.pages == [] and used_pages(s) == 0 and not d.has_work()
    finally:
        del type(r.kv_receiver).busy


def test_a_dead_prefill_fails_its_transfers_while_a_registration_hangs(pair):
    """Decode's heartbeat declares a prefill dead while a registration call to it waits for an
    ACK (the prefill is paused): its receivers fail at once. Dropping the route came first and
    waited for that call's lock, so they failed only when the prefill came back (#10)."""
    r = pair.receiver(88)
    assert poll_until(r, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    svc = pair.decode.decode
    c = svc._control(r.route.ranks[0])
    c.lock.acquire()  # what a registration call waiting for the paused prefill's ACK holds
    try:
        t = threading.Thread(
            target=svc._on_prefill_dead, args=(r.bootstrap_addr, "prefill is unreachable"), daemon=True
        )
        t.start()
        t.join(10)
        assert not t.is_alive(), "the heartbeat verdict waited for the control connection"
        assert r.poll() == KVPoll.Failed and "unreachable" in r.failure_reason
    finally:
        c.lock.release()
