"""PD queues inside the scheduler, with the fake transfer backend and a fake runner."""

import torch

from pdserve.disagg.decode import DecodeDisagg
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.prefill import PrefillDisagg
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.fake import FakeKVManager
from pdserve.disagg.transfer.registry import TransferBackend
from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.request import Req, ReqStatus
from pdserve.sampling_params import SamplingParams
from pdserve.engine.plan import Prealloc, RunOutput
from pdserve.engine.scheduler import Scheduler


class FakeRunner:
    def run(self, plan):
        return RunOutput([7 for it in plan.items if it.sample])


def setup(mode, num_pages=32, ps=4, chunk=64):
    s = Scheduler(
        PageAllocator(num_pages, ps),
        max_running_requests=8,
        chunked_prefill_size=chunk,
        context_length=512,
        eos_ids=(2,),
    )
    kv = torch.zeros(num_pages, 1, 2, ps, 1, 4)
    mgr = FakeKVManager(KVArgs(0, kv), mode)
    cls = PrefillDisagg if mode == DisaggregationMode.PREFILL else DecodeDisagg
    return s, cls(s, mgr, TransferBackend.FAKE, 8998)


def req(rid, n=10, max_new=5, room=42):
    r = Req(rid, list(range(3, 3 + n)), SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True))
    r.bootstrap_host, r.bootstrap_port, r.bootstrap_room = "127.0.0.1", 8998, room
    return r


def step(s, d, outs):
    d.step()
    for o in s.step(FakeRunner().run):
        outs.setdefault(o.rid, []).append(o)


def used_pages(s):
    return s.load().num_used_pages


def test_prefill_flow_forces_one_token_and_frees_after_send():
    s, d = setup(DisaggregationMode.PREFILL)
    r = req("a", max_new=50)
    d.add(r)
    assert r.sampling.max_new_tokens == 1 and d.bootstrap_queue.queue == [r]
    outs = {}
    step(s, d, outs)  # Bootstrapping -> WaitingForInput on the next poll
    for _ in range(6):
        step(s, d, outs)
    final = outs["a"][-1]
    assert final.finish is not None and final.finish.type == "length"
    assert sum(len(o.new_ids) for o in outs["a"]) == 1
    assert r.kv_sender.poll() == KVPoll.Success and r.kv_sender.metadata.output_token_id == 7
    assert r.kv_sender.metadata.room == 42 and r.kv_sender.sent_pages == 3
    assert not d.has_work() and used_pages(s) == 0 and r.status == ReqStatus.FINISHED_LENGTH


def spy_sends(r):
    """Record each send() of the request's sender: (pages, carries metadata, first token out yet)."""
    calls, real = [], r.kv_sender.send

    def send(pages, meta=None):
        calls.append((list(pages), meta is not None, bool(r.output_ids)))
        real(pages, meta)

    r.kv_sender.send = send
    return calls


def test_prefill_sends_each_chunks_pages_before_the_prompt_ends():
    # 30 tokens, chunks of 8, pages of 4: after chunks ending at 8, 16, 24 their full pages
    # go out at once (2 each), the last 2 pages (24..30) with the metadata
    s, d = setup(DisaggregationMode.PREFILL, chunk=8)
    r = req("a", n=30)
    d.add(r)
    calls = spy_sends(r)
    pages, outs = None, {}
    for _ in range(8):
        step(s, d, outs)
        pages = pages or (r.pages[:8] if len(r.pages) >= 8 else None)
    assert [len(p) for p, _, _ in calls] == [2, 2, 2, 2]
    assert [m for _, m, _ in calls] == [False, False, False, True]
    assert [first for _, _, first in calls] == [False, False, False, True]  # before the first token
    assert sum((p for p, _, _ in calls), []) == pages  # every page once, in request order
    assert r.kv_sender.sent_pages == 8 and r.kv_sender.poll() == KVPoll.Success
    assert outs["a"][-1].finish.type == "length" and used_pages(s) == 0 and not d.has_work()


def test_prefill_chunk_sends_start_after_a_cached_prefix():
    # b shares a's first 28 tokens (7 pages, cached): b's first chunk (tokens 28..36) makes
    # pages 0..8 full, prefix included; then 9..10; the last 2 with the metadata
    s, d = setup(DisaggregationMode.PREFILL, num_pages=64, chunk=8)
    a = req("a", n=30, room=1)
    d.add(a)
    outs = {}
    for _ in range(8):
        step(s, d, outs)
    assert outs["a"][-1].finish is not None
    b = Req("b", list(range(3, 33)) + list(range(100, 120)), SamplingParams(max_new_tokens=3, temperature=0))
    b.bootstrap_host, b.bootstrap_port, b.bootstrap_room = "127.0.0.1", 8998, 2
    d.add(b)
    calls = spy_sends(b)
    for _ in range(8):
        step(s, d, outs)
    assert b.cached_tokens == 28
    assert [len(p) for p, _, _ in calls] == [9, 2, 2] and [m for _, m, _ in calls] == [False, False, True]
    assert outs["b"][-1].finish.type == "length" and used_pages(s) == 0


def test_abort_between_chunks_frees_pages_and_fails_the_sender():
    s, d = setup(DisaggregationMode.PREFILL, chunk=8)
    r = req("a", n=30)
    d.add(r)
    calls = spy_sends(r)
    outs = {}
    while not calls:
        step(s, d, outs)
    assert r.kv_sent_pages == 2 and not r.finished
    if not d.abort("a"):  # inside its prefill: the scheduler frees, decode hears at once
        s.abort("a")
    step(s, d, outs)
    assert r.kv_sender.poll() == KVPoll.Failed and outs["a"][-1].finish.type == "abort"
    assert len(calls) == 1 and used_pages(s) == 0 and not d.has_work() and not s.has_work()


def test_decode_failure_between_chunks_stops_the_prefill():
    s, d = setup(DisaggregationMode.PREFILL, chunk=8)
    r = req("a", n=30)
    d.add(r)
    calls = spy_sends(r)
    outs = {}
    while not calls:
        step(s, d, outs)
    r.kv_sender.abort()  # what a decode abort or timeout does to the sender
    computed = s.load().prefill_computed_tokens
    step(s, d, outs)  # the next chunk's forward ends, then the request fails
    assert s.load().prefill_computed_tokens == computed + 8  # not the remaining 14 after it
    assert outs["a"][-1].finish.type == "abort" and "KV transfer" in outs["a"][-1].finish.message
    assert len(calls) == 1 and used_pages(s) == 0 and not s.has_work()


def test_capacity_check_aborts_with_400_in_both_modes():
    for mode in (DisaggregationMode.PREFILL, DisaggregationMode.DECODE):
        s, d = setup(mode, num_pages=4, ps=4)
        d.add(req("big", n=40))
        out = s.take_outputs()[-1]
        assert out.finish.type == "abort" and out.finish.status_code == 400 and "exceeds" in out.finish.message
        assert "KV pool of 16 tokens" in out.finish.message, mode
        assert not d.has_work()


def test_prefill_sender_failure_frees_and_reports():
    s, d = setup(DisaggregationMode.PREFILL)
    r = req("a")
    d.add(r)
    r.kv_sender.abort()
    outs = {}
    step(s, d, outs)
    assert outs["a"][-1].finish.type == "abort" and used_pages(s) == 0
    assert r.status == ReqStatus.FINISHED_ABORT and not d.has_work()


def test_decode_flow_prebuilt_batch_no_recompute():
    s, d = setup(DisaggregationMode.DECODE)
    r = req("a", n=10, max_new=5)
    d.add(r)
    assert r.status == ReqStatus.WAITING_FOR_KV and d.prealloc_queue.queue == [r]
    d.step()  # Bootstrapping
    assert d.prealloc_queue.queue == [r] and not r.pages
    # WaitingForInput -> pages preallocated, init; the fake receiver then reports Success
    # at the transfer queue's poll in the same step: the request is prebuilt at once
    d.step()
    assert r.pages and not d.has_work() and s.get("a") is r and r.status == ReqStatus.RUNNING
    assert r.output_ids == [0] and r.kv_len == 10 and r.is_decoding
    first = s.take_outputs()
    assert [(o.rid, o.new_ids, o.finish) for o in first] == [("a", [0], None)]
    plan = s.schedule()
    assert [(it.start, it.n) for it in plan.items] == [(10, 1)]  # decodes at once, prompt not recomputed
    outs = {}
    s.update(plan, FakeRunner().run(plan))
    for _ in range(10):
        step(s, d, outs)
    assert not s.has_work() and not d.has_work() and used_pages(s) == 0
    assert r.output_ids == [0, 7, 7, 7, 7] and r.transfer_time is not None


def test_decode_prealloc_budget_and_retracted_first():
    # 8 pages of 4 tokens: a and b (3 pages each) run and grow until one is retracted;
    # c (3 pages) waits for budget, and while the retracted request waits in the
    # scheduler no new pages are preallocated: retracted requests resume first
    s, d = setup(DisaggregationMode.DECODE, num_pages=8, ps=4)
    a, b, c = (req(rid, n=10, max_new=12, room=room) for room, rid in enumerate("abc"))
    decisions = []
    real = s.preallocate

    def spy(r, n):
        waiting = s.load().num_waiting_reqs
        got = real(r, n)
        decisions.append((r.rid, waiting, got))
        return got

    s.preallocate = spy
    for r in (a, b):
        d.add(r)
    d.step()
    d.step()
    assert a.pages and b.pages and s.load().num_running_reqs == 2
    d.add(c)
    outs = {}
    for _ in range(60):
        step(s, d, outs)
    assert s.load().num_retractions > 0
    assert ("c", 1, Prealloc.RESUME_FIRST) in decisions
    assert ("c", 0, Prealloc.NO_BUDGET) in decisions
    assert all(got != Prealloc.OK for _, waiting, got in decisions if waiting)
    assert [sum(len(o.new_ids) for o in outs[r.rid]) for r in (a, b, c)] == [12, 12, 12]
    assert all(outs[r.rid][-1].finish.type == "length" for r in (a, b, c))
    assert used_pages(s) == 0


def test_decode_failure_and_abort_free_pages():
    s, d = setup(DisaggregationMode.DECODE)
    a, b = req("a", room=1), req("b", room=2)
    d.add(a)
    d.add(b)
    d.step()  # both Bootstrapping -> WaitingForInput
    a.kv_receiver.abort()  # a's transfer fails before its KV arrives
    assert d.abort("b")  # the client of b goes away
    outs = {}
    step(s, d, outs)
    assert outs["a"][-1].finish.type == "abort" and "KV transfer" in outs["a"][-1].finish.message
    assert outs["b"][-1].finish.type == "abort"
    load = s.load()
    assert not d.has_work() and load.num_used_pages == 0 and load.num_free_pages == load.num_total_pages


def test_decode_room_mismatch_fails():
    s, d = setup(DisaggregationMode.DECODE)
    r = req("a", room=5)
    d.add(r)
    d.step()
    from pdserve.disagg.metadata import KVMetadata

    r.kv_receiver.fake_metadata = KVMetadata(6, output_token_id=1)  # prefill answered another room
    outs = {}
    step(s, d, outs)
    assert outs["a"][-1].finish.type == "abort" and "room" in outs["a"][-1].finish.message
    assert used_pages(s) == 0


def test_no_per_request_state_outlives_the_requests():
    """Hundreds of requests through both sides, some aborted in every queue: the scheduler's
    and the PD queues' tables end empty and the transfer-latency history stays bounded (it
    kept one float per request forever: a slow leak of the decode scheduler, #10)."""
    for mode in (DisaggregationMode.PREFILL, DisaggregationMode.DECODE):
        s, d = setup(mode, num_pages=64)
        outs = {}
        for i in range(300):
            d.add(req(f"r{i}", n=5 + i % 7, max_new=3, room=i))
            if i % 5 == 0:
                d.step()
                if not d.abort(f"r{i}"):
                    s.abort(f"r{i}")
            for _ in range(3):
                step(s, d, outs)
        for _ in range(30):
            step(s, d, outs)
        assert len(outs) == 300 and all(o[-1].finish is not None for o in outs.values())
        assert not s.has_work() and not d.has_work() and used_pages(s) == 0
        assert s.table_sizes() == {"reqs": 0, "waiting": 0, "running": 0, "pending_outs": 0}
        if mode == DisaggregationMode.DECODE:
            assert len(d.transfer_queue.transfer_seconds) == 100
            assert d.stats().avg_transfer_latency_s >= 0
