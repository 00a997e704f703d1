"""tcp, shm, nixl and mooncake backends in one process: exact placement, metadata, many rooms, chunks, tp slicing."""

import random

import numpy as np
import pytest
import torch

from pdserve.disagg.transfer.bootstrap import KVBootstrapServer
from pdserve.disagg.metadata import KVMetadata
from pdserve.disagg.mode import DisaggregationMode as Mode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer import prefill_service, tcp
from pdserve.disagg.transfer.base import KVArgs, KVTransferError
from pdserve.disagg.transfer.heads import head_range
from pdserve.disagg.transfer.registry import KVClassType, get_kv_class
from pdserve.engine.shm_segment import owned_segments
from tests.disagg.helpers import ENGINE_BACKENDS, SHAPE, Pair, make_manager, poll_until, wait_for

BACKENDS = ["tcp", "shm", "gloo", *ENGINE_BACKENDS]

# Timing-sensitive (1-4 s protocol timeouts, threads of five backends in one process): on the
# 2-core CI box one of ~120 cases fails now and then in a full-suite run and passes alone.
# Reruns keep CI meaningful meanwhile; the cause is open (see docs/kv_transfer.md, "Tests").
pytestmark = pytest.mark.flaky(reruns=2, reruns_delay=1)

DONE = {KVPoll.Success, KVPoll.Failed}


@pytest.fixture(params=BACKENDS)
def pair(request):
    p = Pair(request.param)
    yield p
    p.close()


def _untouched(dkv, pages):
    mask = torch.ones(dkv.shape[0], dtype=torch.bool)
    mask[list(pages)] = False
    return dkv[mask].abs().sum().item() == 0


def test_single_transfer_lands_exactly(pair):
    room = 2**63 + 5
    src, dst = [9, 10, 11, 3, 40, 41], [30, 29, 28, 2, 50, 51]  # runs, reversed runs, singletons
    r = pair.receiver(room)
    s = pair.sender(room)
    assert poll_until(r, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    r.init(dst)
    assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    s.init(len(src))
    meta = KVMetadata(room, output_token_id=4242, output_logprob=-1.5, cached_tokens=8, prompt_tokens=21)
    s.send(np.array(src), meta)
    assert poll_until(r, DONE) == KVPoll.Success
    assert poll_until(s, DONE) == KVPoll.Success
    assert r.get_metadata() == meta
    assert torch.equal(pair.dkv[dst], pair.pkv[src])
    assert _untouched(pair.dkv, dst)
    nbytes = len(src) * pair.prefill.args.page_nbytes
    assert pair.prefill.stats().bytes_transferred == nbytes == pair.decode.stats().bytes_transferred
    assert pair.decode.stats().transfers_completed == 1 and pair.decode.stats().gbps > 0


def test_many_concurrent_rooms_and_chunks(pair, monkeypatch):
    monkeypatch.setattr(prefill_service, "MIN_PIECE_BYTES", 1)  # split every request over all queues
    monkeypatch.setattr(tcp, "MAX_FRAME_BYTES", 3 * pair.prefill.args.page_nbytes)  # and into many frames
    rng = random.Random(0)
    free = list(range(SHAPE[0]))
    rng.shuffle(free)
    jobs = []
    for i in range(24):
        n = rng.randint(1, 5)
        dst, free = free[:n], free[n:]
        src = rng.sample(range(SHAPE[0]), n)
        jobs.append((1000 + i, src, dst))
    recvs, sends = {}, {}
    for k, (room, src, dst) in enumerate(jobs):  # half the senders exist before their receivers
        if k % 2:
            sends[room] = pair.sender(room)
        recvs[room] = pair.receiver(room)
    for room, src, dst in jobs:
        if room not in sends:
            sends[room] = pair.sender(room)
        recvs[room].init(dst)
    pending = {room for room, _, _ in jobs}
    chunks = {}
    while pending:  # the scheduler loop: non-blocking polls
        progressed = False
        for room, src, dst in jobs:
            s = sends[room]
            if room in pending and s.poll() == KVPoll.WaitingForInput:
                s.init(len(src))
                if len(src) > 2:  # chunked prefill: first chunk now, rest with the metadata
                    s.send(src[:2])
                    chunks[room] = src[2:]
                else:
                    s.send(src, KVMetadata(room, room % 997))
                pending.discard(room)
                progressed = True
        if not progressed:
            assert wait_for(lambda: any(sends[r].poll() == KVPoll.WaitingForInput for r in pending), 5)
    for room, rest in chunks.items():
        sends[room].send(rest, KVMetadata(room, room % 997))
    for room, src, dst in jobs:
        assert poll_until(recvs[room], DONE, 10) == KVPoll.Success, recvs[room].failure_reason
        assert poll_until(sends[room], DONE) == KVPoll.Success
        assert recvs[room].get_metadata().output_token_id == room % 997
        assert torch.equal(pair.dkv[dst], pair.pkv[src])
    assert _untouched(pair.dkv, [p for _, _, d in jobs for p in d])
    assert pair.decode.stats().transfers_completed == 24
    # the memory-debug tables (engine/memdebug.py) come from the managers themselves, and
    # no per-room state outlives the rooms
    assert wait_for(lambda: pair.prefill.table_sizes()["prefill_rooms"] == 0, 5), pair.prefill.table_sizes()
    assert wait_for(lambda: pair.decode.table_sizes()["decode_receivers"] == 0, 5), pair.decode.table_sizes()


def test_metadata_alone_in_the_last_chunk(pair):
    """All pages in a first chunk, the record alone in an empty last one: META cannot ride
    with a piece, it goes on its own (the path most transfers no longer take)."""
    src, dst = [3, 4, 9], [7, 8, 20]
    r, s = pair.receiver(41), pair.sender(41)
    r.init(dst)
    assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    s.init(3)
    s.send(src)
    s.send([], KVMetadata(41, 77))
    assert poll_until(r, DONE) == KVPoll.Success, r.failure_reason
    assert poll_until(s, DONE) == KVPoll.Success
    assert r.get_metadata().output_token_id == 77
    assert torch.equal(pair.dkv[dst], pair.pkv[src])


def test_tcp_streams_per_transfer(monkeypatch):
    """A tcp transfer of several pieces' worth goes over QUEUE_SIZE connections at once (one
    per worker); the piece size is PDSERVE_DISAGGREGATION_TCP_PIECE_KB."""
    monkeypatch.setenv("PDSERVE_DISAGGREGATION_TCP_PIECE_KB", "128")
    p = Pair("tcp", queue_size=3, thread_pool_size=3)
    try:
        mover = p.prefill.prefill.mover
        assert mover.min_piece_bytes == 128 << 10
        mover.min_piece_bytes = 4 * p.prefill.args.page_nbytes  # tiny test pages: 4 per piece
        src, dst = list(range(40, 80)), list(range(100, 60, -1))  # 40 pages: 3 pieces
        r, s = p.receiver(5), p.sender(5)
        r.init(dst)
        assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
        s.init(len(src))
        s.send(src, KVMetadata(5, 9))
        assert poll_until(r, DONE) == KVPoll.Success, r.failure_reason
        assert torch.equal(p.dkv[dst], p.pkv[src]) and _untouched(p.dkv, dst)
        assert p.decode.table_sizes()["decode_conns"] == 3  # three streams
    finally:
        p.close()


def test_send_contract_errors(pair):
    r, s = pair.receiver(7), pair.sender(7)
    with pytest.raises(RuntimeError, match="WaitingForInput"):
        s.send([1], KVMetadata(7, 1))
    r.init([1, 2])
    assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    with pytest.raises(RuntimeError, match="init"):
        s.send([1, 2], KVMetadata(7, 1))
    s.init(2)
    with pytest.raises(ValueError, match="last one"):
        s.send([1], KVMetadata(7, 1))
    with pytest.raises(ValueError, match="room"):
        s.send([1, 2], KVMetadata(8, 1))
    with pytest.raises(ValueError):
        s.send([1, SHAPE[0]], KVMetadata(7, 1))  # outside prefill's pool
    with pytest.raises(RuntimeError, match="twice"):
        r.init([3])
    s.send([1, 2], KVMetadata(7, 1))
    assert poll_until(r, DONE) == KVPoll.Success


def test_page_count_mismatch_fails_both_sides(pair):
    r, s = pair.receiver(11), pair.sender(11)
    r.init([1, 2, 3, 4])
    assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    s.init(3)
    assert s.poll() == KVPoll.Failed
    with pytest.raises(KVTransferError, match="allocated 4 pages, prefill has 3"):
        s.failure_exception()
    assert poll_until(r, DONE) == KVPoll.Failed  # prefill tells decode
    assert "prefill aborted" in r.failure_reason


def test_aborts_reach_the_other_side(pair):
    r, s = pair.receiver(21), pair.sender(21)
    r.init([5])
    assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    r.abort()
    # one-sided engines: Failed once prefill released decode's standing write grant (its
    # ABORT, a round trip later); the others at once
    assert poll_until(r, DONE) == KVPoll.Failed and not r.busy
    assert poll_until(s, DONE) == KVPoll.Failed and "decode aborted" in s.failure_reason
    r2, s2 = pair.receiver(22), pair.sender(22)
    r2.init([6])
    assert poll_until(s2, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    s2.abort()
    assert poll_until(r2, DONE) == KVPoll.Failed and "aborted by the prefill" in r2.failure_reason
    assert pair.dkv[[5, 6]].abs().sum() == 0


def test_room_collision(pair):
    s1, s2 = pair.sender(31), pair.sender(31)
    assert s2.poll() == KVPoll.Failed and "collision" in s2.failure_reason
    r1, r2 = pair.receiver(31), pair.receiver(31)
    assert r2.poll() == KVPoll.Failed and "collision" in r2.failure_reason
    r1.init([1])
    assert poll_until(s1, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mismatch_is_a_clear_error(backend):
    bs = KVBootstrapServer("127.0.0.1", 0)
    pm = make_manager(backend, Mode.PREFILL, bootstrap_port=bs.port)
    dm = make_manager(backend, Mode.DECODE, shape=(128, 2, 2, 8, 4, 8))  # page_size 8 vs 4
    try:
        r = get_kv_class(backend, KVClassType.RECEIVER)(dm, bs.addr, 1)
        assert poll_until(r, DONE) == KVPoll.Failed
        assert "layout mismatch" in r.failure_reason and "page_size: 8 here vs 4 there" in r.failure_reason
    finally:
        pm.shutdown(), dm.shutdown(), bs.close()


def test_backend_mismatch():
    bs = KVBootstrapServer("127.0.0.1", 0)
    pm = make_manager("tcp", Mode.PREFILL, bootstrap_port=bs.port)
    dm = make_manager("shm", Mode.DECODE)
    try:
        r = get_kv_class("shm", KVClassType.RECEIVER)(dm, bs.addr, 1)
        assert poll_until(r, DONE) == KVPoll.Failed and "backend 'tcp'" in r.failure_reason
    finally:
        pm.shutdown(), dm.shutdown(), bs.close()


def test_shm_decode_needs_a_shared_buffer():
    with pytest.raises(ValueError, match="shm_name"):
        make_manager("shm", Mode.DECODE, kv=torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="allocate_kv_buffer"):
        get_kv_class("shm", KVClassType.MANAGER)(
            KVArgs(0, torch.zeros(SHAPE), shm_name="pdserve-kv-1-00000000"), Mode.DECODE
        )


def _tp_run(backend, tp_p, tp_d, heads=4):
    """tp_p prefill ranks (one bootstrap) and tp_d decode ranks move one request; heads need
    not divide evenly (rank r holds [r*H//T, (r+1)*H//T))."""
    bs = KVBootstrapServer("127.0.0.1", 0)
    g = torch.Generator().manual_seed(3)
    full = torch.randn(16, 2, 2, 4, heads, 8, generator=g).to(torch.bfloat16)
    p_rng = [head_range(i, tp_p, heads) for i in range(tp_p)]
    d_rng = [head_range(i, tp_d, heads) for i in range(tp_d)]
    pms = [
        make_manager(
            backend,
            Mode.PREFILL,
            full[:, :, :, :, a:b].contiguous(),
            engine_rank=i,
            tp_size=tp_p,
            bootstrap_port=bs.port,
            total_num_kv_heads=heads,
        )
        for i, (a, b) in enumerate(p_rng)
    ]
    dms = [
        make_manager(
            backend, Mode.DECODE, engine_rank=i, tp_size=tp_d, shape=(16, 2, 2, 4, b - a, 8), total_num_kv_heads=heads
        )
        for i, (a, b) in enumerate(d_rng)
    ]
    src, dst = np.array([4, 5, 9]), np.array([12, 1, 2])
    try:
        recvs = [get_kv_class(backend, KVClassType.RECEIVER)(dm, bs.addr, 77) for dm in dms]
        sends = [get_kv_class(backend, KVClassType.SENDER)(pm, bs.addr, 77) for pm in pms]
        for r in recvs:
            r.init(dst)
        for s in sends:
            assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
            s.init(3)
            s.send(src, KVMetadata(77, 5))
        for r in recvs:
            assert poll_until(r, DONE) == KVPoll.Success, r.failure_reason
        for dm, (a, b) in zip(dms, d_rng):
            got = dm.args.kv_data
            assert torch.equal(got[dst], full[src][:, :, :, :, a:b])
            assert _untouched(got, dst)
        # decode may see Success before prefill's worker records its META as sent
        assert wait_for(lambda: all(s.poll() == KVPoll.Success for s in sends))
    finally:
        for m in pms + dms:
            m.shutdown()
            if m.args.shm_name:
                from pdserve.engine.shm_segment import free_kv_buffer

                free_kv_buffer(m.args.shm_name)
        bs.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tp_p,tp_d,heads", [(1, 2, 4), (2, 1, 4), (2, 4, 4), (1, 2, 3), (2, 1, 3), (3, 2, 3)])
def test_tp_head_slicing(backend, tp_p, tp_d, heads):
    _tp_run(backend, tp_p, tp_d, heads)


def test_no_segment_left_behind():
    import os

    mine = [f for f in os.listdir("/dev/shm") if f.startswith(f"pdserve-kv-{os.getpid()}-")]
    assert owned_segments() == [] and mine == []


def test_tcp_staged_path_for_device_buffers(monkeypatch):
    """GPU pools cannot be handed to sendmsg/recvmsg_into: they go through staging tensors.
    Force that path on CPU buffers (no byte view) and check the bytes still land exactly."""
    monkeypatch.setattr(tcp, "byte_view", lambda kv: None)
    monkeypatch.setattr(tcp, "STAGING_BYTES", 2 * SHAPE[1] * 2 * SHAPE[3] * SHAPE[4] * SHAPE[5] * 2)  # 2 pages
    p = Pair("tcp")
    try:
        src, dst = [5, 6, 7, 20, 21], [1, 0, 9, 8, 3]
        r, s = p.receiver(3), p.sender(3)
        r.init(dst)
        assert poll_until(s, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
        s.init(5)
        s.send(src, KVMetadata(3, 1))
        assert poll_until(r, DONE) == KVPoll.Success, r.failure_reason
        assert torch.equal(p.dkv[dst], p.pkv[src]) and _untouched(p.dkv, dst)
    finally:
        p.close()
