"""Prefill and decode in separate processes (spawn): real sockets, real shared memory, real kills."""

import multiprocessing as mp
import os
import signal

import pytest
import torch

from pdserve.disagg.mode import DisaggregationMode as Mode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.registry import KVClassType, get_kv_class
from pdserve.engine.shm_segment import cleanup_stale_segments
from tests.disagg import procs
from tests.disagg.helpers import SHAPE, make_manager, poll_until, random_kv

DONE = {KVPoll.Success, KVPoll.Failed}
ctx = mp.get_context("spawn")


class Child:
    """A prefill process (bootstrap server + prefill rank) running procs.prefill_main."""

    def __init__(self, backend, seed, jobs, overrides=None):
        self.out, self.stop = ctx.Queue(), ctx.Event()
        self.proc = ctx.Process(
            target=procs.prefill_main, args=(backend, seed, jobs, self.out, self.stop, overrides or {}), daemon=True
        )
        self.proc.start()

    def close(self):
        if not self.proc.is_alive():
            return  # never signal a dead child's Event: notify_all would wait for it forever
        self.stop.set()
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_cross_process_transfer(backend):
    seed = 7
    jobs = [(500 + i, [(3 * i + k) % SHAPE[0] for k in range(1 + i % 4)], 100 + i) for i in range(12)]
    dst = {}
    nxt = 0
    for room, src, _ in jobs:
        dst[room] = [(SHAPE[0] - 1 - nxt - k) for k in range(len(src))]
        nxt += len(src)
    child = Child(backend, seed, jobs)
    dm = None
    try:
        tag, port = child.out.get(timeout=60)
        assert tag == "ready"
        dm = make_manager(backend, Mode.DECODE)
        recv_cls = get_kv_class(backend, KVClassType.RECEIVER)
        recvs = {room: recv_cls(dm, f"127.0.0.1:{port}", room) for room, _, _ in jobs}
        for room, _, _ in jobs:  # decode allocates once bootstrapped
            assert poll_until(recvs[room], {KVPoll.WaitingForInput}, 10) == KVPoll.WaitingForInput
            recvs[room].init(dst[room])
        expected = random_kv(SHAPE, torch.bfloat16, seed)  # the child's buffer, rebuilt from its seed
        for room, src, token in jobs:
            assert poll_until(recvs[room], DONE, 20) == KVPoll.Success, recvs[room].failure_reason
            assert torch.equal(dm.args.kv_data[dst[room]], expected[src])
            md = recvs[room].get_metadata()
            assert (md.room, md.output_token_id, md.prompt_tokens) == (room, token, len(src) * 4)
        used = [p for d in dst.values() for p in d]
        mask = torch.ones(SHAPE[0], dtype=torch.bool)
        mask[used] = False
        assert dm.args.kv_data[mask].abs().sum() == 0
        reports = dict(child.out.get(timeout=20) for _ in jobs)
        assert set(reports.values()) == {"Success"}
    finally:
        if dm is not None:
            dm.shutdown()
        child.close()


def test_prefill_killed_fails_receivers_via_heartbeat():
    child = Child("tcp", 0, [])
    dm = None
    try:
        tag, port = child.out.get(timeout=60)
        dm = make_manager("tcp", Mode.DECODE, waiting_timeout=60.0)  # only the heartbeat can fail them
        addr = f"127.0.0.1:{port}"
        recvs = [get_kv_class("tcp", KVClassType.RECEIVER)(dm, addr, room) for room in (1, 2, 3)]
        for i, r in enumerate(recvs):
            assert poll_until(r, {KVPoll.WaitingForInput}, 10) == KVPoll.WaitingForInput
            r.init([i])
        for r in recvs:
            assert r.registered.wait(5)  # prefill holds our page indices
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.join(5)
        for r in recvs:
            assert poll_until(r, DONE, 5) == KVPoll.Failed  # 2 missed beats at 0.2 s
            assert f"prefill bootstrap server {addr} is unreachable" in r.failure_reason
            assert "2 consecutive heartbeats failed" in r.failure_reason
        late = get_kv_class("tcp", KVClassType.RECEIVER)(dm, addr, 9)  # a new request to the dead prefill
        assert poll_until(late, DONE, 5) == KVPoll.Failed
        assert dm.stats().transfers_failed == 4
    finally:
        if dm is not None:
            dm.shutdown()
        child.close()


def test_stale_segment_of_killed_process_is_removed():
    q = ctx.Queue()
    p = ctx.Process(target=procs.shm_owner_main, args=((4, 1, 2, 2, 1, 8), q), daemon=True)
    p.start()
    try:
        name = q.get(timeout=60)
        assert os.path.exists(f"/dev/shm/{name}")
    finally:
        p.kill()  # SIGKILL: no atexit, the segment stays behind
        p.join(5)
    assert os.path.exists(f"/dev/shm/{name}")
    assert name in cleanup_stale_segments()  # also runs on every allocate_kv_buffer
    assert not os.path.exists(f"/dev/shm/{name}")
