"""A PD request's KV sent chunk by chunk while the prefill runs (disagg/prefill.py), through
every real backend in one process: the prefill and decode schedulers with their PD queues
and a runner that writes each computed token's KV slots into the prefill pool, as a forward
does. A prompt over several chunks arrives complete and equal; an abort between chunks, on
either side, leaves both pools free."""

import threading
import time

import pytest
import torch

from pdserve.disagg.decode import DecodeDisagg
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.prefill import PrefillDisagg
from pdserve.disagg.transfer.registry import TransferBackend
from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.request import Req
from pdserve.engine.plan import RunOutput
from pdserve.engine.scheduler import Scheduler
from pdserve.sampling_params import SamplingParams
from tests.disagg.helpers import ENGINE_BACKENDS, SHAPE, Pair, wait_for

pytestmark = pytest.mark.flaky(reruns=2, reruns_delay=1)  # threads of real backends, 2 busy cores

PAGE = SHAPE[3]
FIRST_TOKEN = 11


def kv_value(room: int, pos: int) -> float:
    assert pos < 63
    return float(room % 4 * 64 + pos + 1)  # integers <= 256: exact in bfloat16


class PoolWritingRunner:
    """Writes the KV slots of every token a plan computes (prefill: the prefill pool)."""

    def __init__(self, kv: torch.Tensor | None, seconds: float = 0.0) -> None:
        self.kv = kv
        self.seconds = seconds  # per forward: the transfer of chunk k overlaps chunk k+1

    def run(self, plan) -> RunOutput:
        time.sleep(self.seconds)
        for it in plan.items:
            if self.kv is not None:
                for pos in range(it.start, it.start + it.n):
                    page = it.req.pages[pos // PAGE]
                    self.kv[page, :, :, pos % PAGE] = kv_value(it.req.bootstrap_room, pos)
        return RunOutput([FIRST_TOKEN if self.kv is not None else 7 for it in plan.items if it.sample])


class Deployment:
    """1P1D in one process: two schedulers (chunks of 8 tokens on prefill), their PD queues
    on a real transfer pair."""

    def __init__(self, backend: str) -> None:
        self.pair = Pair(backend)
        b = TransferBackend(backend)

        def sched(chunk: int) -> Scheduler:
            return Scheduler(
                PageAllocator(SHAPE[0], PAGE),
                max_running_requests=8,
                chunked_prefill_size=chunk,
                context_length=1024,
                eos_ids=(2,),
                disable_radix_cache=True,
            )

        self.ps, self.ds = sched(8), sched(512)
        self.pq = PrefillDisagg(self.ps, self.pair.prefill, b, self.pair.bs.port)
        self.dq = DecodeDisagg(self.ds, self.pair.decode, b, self.pair.bs.port)
        self.prunner, self.drunner = PoolWritingRunner(self.pair.pkv, 0.005), PoolWritingRunner(None)
        self.outs: dict[str, dict[str, list]] = {"prefill": {}, "decode": {}}

    def submit(self, rid: str, n: int, room: int, max_new: int = 4) -> tuple[Req, Req]:
        pair = []
        for q in (self.pq, self.dq):
            r = Req(rid, list(range(3, 3 + n)), SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True))
            r.bootstrap_host, r.bootstrap_port, r.bootstrap_room = "127.0.0.1", self.pair.bs.port, room
            q.add(r)
            pair.append(r)
        return pair[0], pair[1]

    def step(self) -> None:
        for side, q, s, runner in (
            ("prefill", self.pq, self.ps, self.prunner),
            ("decode", self.dq, self.ds, self.drunner),
        ):
            q.step()
            for o in s.step(runner.run):
                self.outs[side].setdefault(o.rid, []).append(o)

    def run_until(self, pred, timeout: float = 20.0) -> bool:
        def one() -> bool:
            self.step()
            return pred()

        return wait_for(one, timeout, step=0.002)

    def idle(self) -> bool:
        return not (self.ps.has_work() or self.pq.has_work() or self.ds.has_work() or self.dq.has_work())

    def pools_free(self) -> bool:
        return self.ps.load().num_used_pages == 0 and self.ds.load().num_used_pages == 0

    def close(self) -> None:
        self.pair.close()


@pytest.fixture(params=["tcp", "shm", "gloo", *ENGINE_BACKENDS])
def dep(request):
    d = Deployment(request.param)
    yield d
    d.close()


def _spy(endpoint, name: str) -> list:
    calls, real = [], getattr(endpoint, name)

    def spy(pages, *rest):
        calls.append(list(pages))
        return real(pages, *rest)

    setattr(endpoint, name, spy)
    return calls


def test_prompt_over_several_chunks_arrives_complete_and_equal(dep):
    # 45 tokens: chunks end at 8..40, then 45; 12 pages, the last one partly filled
    reqs = [dep.submit(f"r{i}", n, room) for i, (n, room) in enumerate([(45, 5), (21, 6), (8, 7)])]
    sends = {p.rid: _spy(p.kv_sender, "send") for p, _ in reqs}
    dst = {d.rid: _spy(d.kv_receiver, "init") for _, d in reqs}
    assert dep.run_until(dep.idle), (dep.ps.table_sizes(), dep.ds.table_sizes())
    for (p, d), n in zip(reqs, (45, 21, 8)):
        outs = dep.outs["decode"][d.rid]
        assert outs[-1].finish.type == "length" and sum(len(o.new_ids) for o in outs) == 4
        assert outs[0].new_ids[0] == FIRST_TOKEN, "the first token is prefill's"
        assert d.kv_receiver.poll() == KVPoll.Success
        (pages,) = dst[d.rid]
        for pos in range(n):  # every computed slot of every layer, K and V, all heads
            slot = dep.pair.dkv[pages[pos // PAGE], :, :, pos % PAGE].float()
            assert torch.all(slot == kv_value(p.bootstrap_room, pos)), (d.rid, pos)
    # the long prompt (first in line: each step's 8-token budget is its own) went out in 6
    # sends, 5 of them while later chunks still computed; the others as the budget fell
    assert [len(c) for c in sends["r0"]] == [2, 2, 2, 2, 2, 2]
    assert [sum(map(len, sends[r])) for r in ("r1", "r2")] == [6, 2]
    assert dep.pools_free()
    assert dep.pair.decode.stats().transfers_completed == 3


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_abort_between_chunks_frees_both_pools(dep, side):
    p, d = dep.submit("a", 60, 9)
    sends = _spy(p.kv_sender, "send")
    assert dep.run_until(lambda: len(sends) >= 1), "no chunk was sent"
    assert not p.finished and p.kv_sent_pages < 15
    # the client went away (the server calls the PD queues' abort, then the scheduler's)
    queues, sched = (dep.pq, dep.ps) if side == "prefill" else (dep.dq, dep.ds)
    if not queues.abort("a"):
        sched.abort("a")
    if side == "prefill":  # on this thread: no further chunk computes or goes out
        assert p.finished and len(sends) == 1
    assert dep.run_until(lambda: dep.idle() and dep.pools_free()), (dep.ps.load(), dep.ds.load())
    assert p.finished and d.finished and d.finish_reason.type == "abort"
    assert p.kv_sender.poll() == KVPoll.Failed and d.kv_receiver.poll() == KVPoll.Failed
    assert dep.outs["prefill"]["a"][-1].finish.type == "abort"
    # both sides work on afterwards
    p2, d2 = dep.submit("b", 20, 10)
    assert dep.run_until(dep.idle)
    assert d2.kv_receiver.poll() == KVPoll.Success and dep.outs["decode"]["b"][-1].finish.type == "length"
    assert dep.pools_free()


@pytest.fixture
def held_send(dep):
    """Prefill's first piece write waits for `go` once it started (`started` is set): a write
    under way, reading prefill's pages, while the request is aborted."""
    started, go = threading.Event(), threading.Event()
    mover = dep.pair.prefill.prefill.mover
    real, calls = mover.send_piece, []

    def send_piece(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            started.set()
            assert go.wait(10)
        return real(*a, **kw)

    mover.send_piece = send_piece
    yield started, go
    go.set()


@pytest.mark.parametrize("case", ["prefill aborts between chunks", "decode aborts after the last chunk"])
def test_prefill_pages_stay_allocated_while_a_write_reads_them(dep, held_send, case):
    """An aborted or failed prefill request ends at once, but its pages are not freed (and so
    cannot be reallocated and overwritten) while a transfer worker still sends them; they
    are freed once that write ends (#14)."""
    started, go = held_send
    between = case.startswith("prefill")
    p, d = dep.submit("a", 60 if between else 6, 12)
    assert dep.run_until(started.is_set), "no write started"
    used = dep.ps.load().num_used_pages
    assert used > 0
    if between:
        assert not p.finished and p.kv_sent_pages < 15
        if not dep.pq.abort("a"):
            dep.ps.abort("a")
    else:
        assert dep.run_until(lambda: p in dep.pq.inflight)
        assert dep.dq.abort("a")
    assert dep.run_until(lambda: p.finished and p.kv_sender.poll() == KVPoll.Failed), p.status
    for _ in range(20):  # the write is still under way: the pages stay allocated
        dep.step()
    assert dep.ps.load().num_used_pages == used, "prefill freed pages a write still reads"
    assert p.kv_sender.busy and p in dep.pq.parked
    assert dep.pq.stats().parked_reqs == 1
    go.set()
    assert dep.run_until(lambda: dep.idle() and dep.pools_free()), (dep.ps.load(), dep.ds.load())
    assert not p.kv_sender.busy and dep.pq.parked.reqs == []
    assert dep.outs["prefill"]["a"][-1].finish.type == "abort"
    # both sides work on afterwards
    p2, d2 = dep.submit("b", 20, 13)
    assert dep.run_until(dep.idle)
    assert d2.kv_receiver.poll() == KVPoll.Success and dep.outs["decode"]["b"][-1].finish.type == "length"
    assert dep.pools_free()
