"""Tensor parallelism pieces in one process: sharding math (even and uneven head splits),
a sharded forward (ranks as threads, all-reduce through the real shared-memory algorithm)
equal to the whole model for Llama/Qwen2/Qwen3, the all-reduce itself, and the batch codec."""

import threading
import time

import numpy as np
import pytest
import torch

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner
from pdserve.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.tp import SLOT_ELEMS, ShmAllReduce, decode_batch, decode_header, encode_batch
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel, random_state
from pdserve.model.tp import TPShard, full_shape, gather_shards, shard_state


def test_shards_tile_heads_and_mlp():
    cfg = ModelConfig.tiny(num_heads=9, num_kv_heads=3, intermediate_size=1536, hidden_size=576, head_dim=64)
    shards = [TPShard.of(cfg, r, 2) for r in range(2)]
    assert [s.kv_heads for s in shards] == [(0, 1), (1, 3)]
    assert [s.q_heads for s in shards] == [(0, 3), (3, 9)]
    assert [s.inter for s in shards] == [(0, 768), (768, 1536)]
    assert shards[1].local_config(cfg).num_heads == 6 and shards[1].local_config(cfg).num_kv_heads == 2
    for tp in (1, 2, 3):
        got = [TPShard.of(cfg, r, tp) for r in range(tp)]
        assert [h for s in got for h in range(*s.q_heads)] == list(range(9))
        assert [i for s in got for i in range(*s.inter)] == list(range(1536))
        assert all((s.inter[1] - s.inter[0]) % 32 == 0 for s in got)  # 4-bit groups stay whole
    with pytest.raises(ValueError, match="--tp-size 4: the model has 3 KV heads"):
        TPShard.of(cfg, 0, 4)


@pytest.mark.parametrize("tp", [2, 3])
def test_gathered_shards_are_the_whole_weights(tp):
    """What weight sync relies on: every rank's shard (shard_state) put back together in rank
    order (gather_shards) is the whole tensor, and full_shape finds the whole shape from a
    shard's."""
    cfg = ModelConfig.tiny(
        num_heads=9, num_kv_heads=3, intermediate_size=96, hidden_size=48, head_dim=16, qkv_bias=True
    )
    state = random_state(cfg, 0)
    shards = [shard_state(state, cfg, TPShard.of(cfg, r, tp)) for r in range(tp)]
    for name, whole in state.items():
        parts = [sh[name] for sh in shards]
        torch.testing.assert_close(gather_shards(name, parts), whole, rtol=0, atol=0)
        assert all(full_shape(name, tuple(p.shape), cfg) == tuple(whole.shape) for p in parts), name
    assert shards[0]["model.layers.0.self_attn.o_proj.weight"].shape == (48, 3 * 16)  # 3 of 9 query heads


class ThreadGroup:
    """T ranks as threads sharing one all-reduce buffer (the algorithm of the real processes)."""

    def __init__(self, size: int) -> None:
        self.buf = torch.zeros(ShmAllReduce.nbytes(size), dtype=torch.uint8)
        self.size = size

    def reducer(self, rank: int, check_alive=lambda: None) -> ShmAllReduce:
        return ShmAllReduce(self.buf, rank, self.size, check_alive)

    def run(self, fns):
        out: list = [None] * len(fns)
        errs: list = []

        def go(i):
            try:
                out[i] = fns[i]()
            except BaseException as e:  # surfaced below
                errs.append(e)

        ts = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errs, errs
        return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("heads,kv,tp", [(4, 2, 2), (6, 3, 2), (6, 3, 3)], ids=["even", "uneven", "tp3"])
def test_sharded_forward_equals_whole(arch, heads, kv, tp):
    cfg = ModelConfig.tiny(
        arch=arch,
        num_heads=heads,
        num_kv_heads=kv,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        intermediate_size=192,
    )
    state = random_state(cfg, seed=1)
    whole = LlamaModel(cfg, torch.float32)
    whole.load_weights(state)
    w_runner = ModelRunner(whole, 64, 4)
    group = ThreadGroup(tp)
    runners = []
    for r in range(tp):
        sh = TPShard.of(cfg, r, tp)
        m = LlamaModel(sh.local_config(cfg), torch.float32)
        m.load_weights(shard_state(state, cfg, sh))
        m.all_reduce = group.reducer(r)
        runners.append(ModelRunner(m, 64, 4))
    s = Scheduler(PageAllocator(64, 4), max_running_requests=4, chunked_prefill_size=6, context_length=256, eos_ids=())
    s.add_request(Req("a", [5, 17, 33, 100, 2, 250, 7, 9, 11], SamplingParams(max_new_tokens=6, temperature=0)))
    s.add_request(Req("b", [8, 3, 1], SamplingParams(max_new_tokens=6, temperature=0)))
    steps = 0
    while s.has_work():
        plan = s.schedule()
        ref = whole.forward(w_runner.build_batch(plan), w_runner.attn)
        got = group.run([lambda rn=rn: rn.model.forward(rn.build_batch(plan), rn.attn) for rn in runners])
        for g in got:
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4)
        assert all(torch.equal(g, got[0]) for g in got)  # every rank holds the same hidden state
        s.update(plan, w_runner.run(plan))
        steps += 1
    assert steps >= 6  # chunked prefill + decode steps with both requests


def test_shm_allreduce_sums_in_rank_order_and_chunks():
    group = ThreadGroup(3)
    reds = [group.reducer(r) for r in range(3)]
    g = torch.Generator().manual_seed(0)
    for dtype, n in ((torch.float32, 576), (torch.bfloat16, 64 * 576), (torch.float32, SLOT_ELEMS * 2 + 5)):
        xs = [torch.randn(n, generator=g).to(dtype) for _ in range(3)]
        want = (xs[0].float() + xs[1].float() + xs[2].float()).to(dtype)
        outs = group.run([lambda r=r: reds[r](xs[r].clone()) for r in range(3)])
        for o in outs:
            assert torch.equal(o, outs[0])  # bit-identical on every rank
            torch.testing.assert_close(o, want)


def test_shm_allreduce_notices_a_dead_peer():
    group = ThreadGroup(2)
    deadline = time.monotonic() + 0.3

    def check_alive():
        if time.monotonic() > deadline:
            raise RuntimeError("tensor-parallel rank 1 exited")

    with pytest.raises(RuntimeError, match="rank 1 exited"):
        group.reducer(0, check_alive)(torch.ones(8))


def test_batch_codec_roundtrip_and_rejects_bad_frames():
    cfg = ModelConfig.tiny()
    m = LlamaModel(cfg, torch.float32)
    m.init_random()
    rn = ModelRunner(m, 64, 4)
    s = Scheduler(PageAllocator(64, 4), max_running_requests=4, chunked_prefill_size=5, context_length=256, eos_ids=())
    s.add_request(Req("a", list(range(3, 12)), SamplingParams(max_new_tokens=3, temperature=0)))
    s.add_request(Req("b", [4, 5, 6], SamplingParams(max_new_tokens=3, temperature=0)))
    seen_ctx = seen_dec = False
    while s.has_work():
        plan = s.schedule()
        batch = rn.build_batch(plan)
        frames = [bytes(f) for f in encode_batch(batch)]
        h = decode_header(frames[0])
        back = decode_batch(h, frames[1:])
        assert back.num_decode == batch.num_decode and len(back.extends) == len(batch.extends)
        for name in ("input_ids", "positions", "write_pages", "write_offs", "dec_table", "dec_mask", "logits_indices"):
            a, b = getattr(batch, name), getattr(back, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        for a, b in zip(batch.extends, back.extends):
            assert (a.q_start, a.q_len, a.prefix_len) == (b.q_start, b.q_len, b.prefix_len)
            if a.ctx_pages is not None:
                seen_ctx = True
                assert torch.equal(a.ctx_pages, b.ctx_pages) and torch.equal(a.ctx_offs, b.ctx_offs)
        seen_dec |= batch.num_decode > 0
        s.update(plan, rn.run(plan))
    assert seen_ctx and seen_dec
    with pytest.raises(ValueError, match="bytes for shape"):
        decode_batch(h, [frames[1][:-8]] + frames[2:])
    with pytest.raises(ValueError, match="tensors announced"):
        decode_batch(h, frames[1:-1])
    h.tensors[0].dtype = "object"
    with pytest.raises(ValueError, match="bad tensor header"):
        decode_batch(h, frames[1:])
    assert np.frombuffer(frames[1], dtype=np.int64).size == len(batch.input_ids)
