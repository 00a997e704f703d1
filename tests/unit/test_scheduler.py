"""Scheduler on synthetic requests: a fake runner for policy, the tiny random
model for end-to-end equivalences (chunking, prefix cache, retraction)."""

import random

import pytest
import torch

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner
from pdserve.sampling_params import SamplingParams
from pdserve.engine.plan import RunOutput
from pdserve.engine.scheduler import Scheduler
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel

CFG = ModelConfig.tiny()


def make(num_pages=64, ps=4, chunk=16, max_running=8, cache=True):
    return Scheduler(
        PageAllocator(num_pages, ps),
        max_running_requests=max_running,
        chunked_prefill_size=chunk,
        context_length=512,
        eos_ids=(2,),
        disable_radix_cache=not cache,
    )


class FakeRunner:
    """Returns token 7 for every sampled item (never EOS)."""

    def run(self, plan):
        return RunOutput([7 for it in plan.items if it.sample])


def collect(outs, new):
    for o in new:
        outs.setdefault(o.rid, []).extend(o.new_ids)
        if o.finish is not None:
            outs[o.rid + ":finish"] = o.finish


def drain(s, runner, limit=10_000):
    outs = {}
    for _ in range(limit):
        if not s.has_work():
            break
        collect(outs, s.step(runner.run))
    collect(outs, s.take_outputs())
    assert not s.has_work(), "the scheduler did not finish its requests"
    return outs


def assert_all_free(s):
    load = s.load()
    assert load.num_used_pages == 0
    assert load.num_free_pages + load.num_cached_pages == load.num_total_pages
    assert s.flush_cache()
    assert s.load().num_free_pages == load.num_total_pages


def req(rid, n_in, max_new=5, **kw):
    return Req(rid, list(range(3, 3 + n_in)), SamplingParams(max_new_tokens=max_new, temperature=0, **kw))


def test_chunked_prefill_respects_budget():
    s = make(chunk=8)
    s.add_request(req("a", 30))
    plan = s.schedule()
    assert plan.num_tokens == 8 and not plan.items[0].sample
    s.update(plan, FakeRunner().run(plan))
    plan = s.schedule()
    assert plan.items[0].start == 8
    out = drain(s, FakeRunner())
    assert len(out["a"]) == 5 and out["a:finish"].type == "length"
    assert_all_free(s)


def test_token_budget_caps_one_step_below_the_chunk_size():
    """Semi-PD caps a prefill forward while decode runs: `schedule(token_budget)` for one
    step, the chunked-prefill size again without it; never above the chunk size."""
    s = make(chunk=16)
    s.add_request(req("a", 40))
    plan = s.schedule(token_budget=5)
    assert plan.num_tokens == 5
    s.update(plan, FakeRunner().run(plan))
    plan = s.schedule(token_budget=100)  # no more than the chunk size
    assert plan.items[0].start == 5 and plan.num_tokens == 16
    s.update(plan, FakeRunner().run(plan))
    plan = s.schedule()
    assert plan.items[0].start == 21 and plan.num_tokens == 16
    s.update(plan, FakeRunner().run(plan))
    out = drain(s, FakeRunner())
    assert len(out["a"]) == 5
    assert_all_free(s)


def test_max_running_requests_caps_batch():
    s = make(max_running=2, chunk=100)
    for i in range(5):
        s.add_request(req(f"r{i}", 3))
    plan = s.schedule()
    assert len(plan.items) == 2 and s.load().num_waiting_reqs == 3
    out = drain(s, FakeRunner())
    assert all(len(out[f"r{i}"]) == 5 for i in range(5))
    assert_all_free(s)


def test_oversized_prompt_rejected_with_400():
    s = make(num_pages=4, ps=4)
    s.add_request(req("big", 40))
    outs = s.step(FakeRunner().run)
    fin = [o for o in outs if o.rid == "big"][0].finish
    assert fin.type == "abort" and fin.status_code == 400 and "KV pool" in fin.message
    assert (
        fin.message == "prompt of 40 tokens exceeds the KV pool of 16 tokens (the prompt and one output token must fit)"
    )
    assert not s.has_work()
    assert_all_free(s)


def test_admission_rejects_duplicates_and_long_prompts():
    s = make(num_pages=256)  # the pool (1024 tokens) is larger than the context (512)
    s.add_request(req("a", 4))
    s.add_request(req("a", 4))
    s.add_request(req("long", 600))
    outs = {o.rid: o.finish for o in s.take_outputs()}
    assert "duplicate" in outs["a"].message and outs["a"].status_code == 400
    assert "context length" in outs["long"].message and outs["long"].status_code == 400
    assert s.load().num_waiting_reqs == 1


def test_abort_frees_pages():
    s = make()
    s.add_request(req("a", 20, max_new=50))
    for _ in range(3):
        plan = s.schedule()
        s.update(plan, FakeRunner().run(plan))
    assert s.load().num_used_pages > 0
    s.abort("a")
    assert s.take_outputs()[0].finish.type == "abort"
    assert not s.has_work() and s.get("a") is None
    assert_all_free(s)


def test_stop_token_and_eos():
    s = make()
    s.add_request(req("a", 4, max_new=10, stop_token_ids=[7]))
    out = drain(s, FakeRunner())
    assert out["a"] == [7] and out["a:finish"].type == "stop" and out["a:finish"].matched == 7


def test_retraction_when_pool_runs_out():
    # 10 pages of 4 tokens; 4 requests each needing up to 4+20 tokens -> cannot all fit
    s = make(num_pages=10, ps=4, chunk=64)
    for i in range(4):
        s.add_request(req(f"r{i}", 4, max_new=20))
    out = drain(s, FakeRunner())
    assert s.load().num_retractions > 0
    assert all(len(out[f"r{i}"]) == 20 for i in range(4))
    assert_all_free(s)


# ---- real tiny model: outputs must not depend on how the work was scheduled ----------


def run_tiny(prompts, max_new=12, **sched_kw):
    torch.manual_seed(0)
    model = LlamaModel(CFG, torch.float32)
    model.init_random(0)
    s = make(**sched_kw)
    runner = ModelRunner(model, s.load().num_total_pages, s.page_size)
    for i, p in enumerate(prompts):
        s.add_request(Req(f"r{i}", p, SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)))
    out = drain(s, runner)
    assert_all_free(s)
    return [out[f"r{i}"] for i in range(len(prompts))], s


PROMPTS = [[random.Random(i).randrange(3, 250) for _ in range(n)] for i, n in enumerate([5, 17, 33, 8, 60, 3])]


def test_reference_one_by_one_matches_batched():
    ref = [run_tiny([p], chunk=512, num_pages=128)[0][0] for p in PROMPTS]
    batched, _ = run_tiny(PROMPTS, chunk=512, num_pages=128)
    assert batched == ref


def test_chunking_and_page_size_do_not_change_outputs():
    ref, _ = run_tiny(PROMPTS, chunk=512, num_pages=128, ps=4)
    for kw in (
        dict(chunk=7, ps=4, num_pages=128),
        dict(chunk=16, ps=1, num_pages=512),
        dict(chunk=512, ps=16, num_pages=64),
    ):
        got, _ = run_tiny(PROMPTS, **kw)
        assert got == ref, kw


def test_prefix_cache_reuse_same_outputs():
    shared = PROMPTS[4]
    prompts = [shared + [5, 6, 7], shared + [9], shared]
    ref = [run_tiny([p], num_pages=128, cache=False)[0][0] for p in prompts]
    model = LlamaModel(CFG, torch.float32)
    model.init_random(0)
    s = make(num_pages=128)
    runner = ModelRunner(model, 128, 4)
    outs = []
    for i, p in enumerate(prompts):  # sequentially, so later ones hit the cache
        s.add_request(Req(f"q{i}", p, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)))
        outs.append(drain(s, runner)[f"q{i}"])
    assert outs == ref
    assert s.load().cache_hit_tokens >= 2 * (len(shared) // 4 * 4) - 8


def test_retraction_same_outputs():
    ref, _ = run_tiny(PROMPTS, max_new=20, num_pages=256)
    got, s = run_tiny(PROMPTS, max_new=20, num_pages=30, ps=4)
    assert s.load().num_retractions > 0
    assert got == ref


def test_input_logprobs_match_a_full_forward_and_ignore_chunking():
    from pdserve.model.attention import ExtendSeq, ForwardBatch, TorchNativeAttention

    prompt = PROMPTS[4]
    model = LlamaModel(CFG, torch.float32)
    model.init_random(0)
    n = len(prompt)
    kv = torch.zeros(64, CFG.num_layers, 2, 4, CFG.num_kv_heads, CFG.head_dim)
    pos = torch.arange(n)
    batch = ForwardBatch(
        torch.tensor(prompt), pos, pos // 4, pos % 4, extends=[ExtendSeq(0, n, 0, None, None)], logits_indices=pos
    )
    lp = torch.log_softmax(model.forward(batch, TorchNativeAttention(kv)), -1)
    ref = [lp[i, prompt[i + 1]].item() for i in range(n - 1)]
    for chunk in (512, 7):
        s = make(chunk=chunk, num_pages=128)
        runner = ModelRunner(model, 128, 4)
        r = Req("a", prompt, SamplingParams(max_new_tokens=3, temperature=0), return_logprob=True)
        s.add_request(r)
        drain(s, runner)
        assert len(r.logprobs) == 3
        got = [o for o in [r.input_logprobs]][0]
        assert got == pytest.approx(ref, abs=1e-4), chunk
        assert s.load().cache_hit_tokens == 0


def test_runner_with_fake_attention_runs_the_plan():
    """The runner takes its attention backend by name; with the fake one the whole
    schedule -> run -> update path runs and frees every page."""
    from pdserve.model.attention_backends import FakeAttention

    model = LlamaModel(CFG, torch.float32)
    model.init_random(0)
    s = make(num_pages=64, chunk=8)
    runner = ModelRunner(model, 64, 4, attention_backend="fake")
    assert isinstance(runner.attn, FakeAttention)
    for i, p in enumerate(PROMPTS[:3]):
        s.add_request(Req(f"r{i}", p, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)))
    out = drain(s, runner)
    assert [len(out[f"r{i}"]) for i in range(3)] == [4, 4, 4]
    assert_all_free(s)


def test_seeded_sampling_is_reproducible_and_the_request_owns_its_generator():
    model = LlamaModel(CFG, torch.float32)
    model.init_random(0)
    got = []
    for _ in range(2):
        s = make(num_pages=64)
        runner = ModelRunner(model, 64, 4)
        r = Req("a", PROMPTS[1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=1234, ignore_eos=True))
        assert r.generator is not None
        s.add_request(r)
        got.append(drain(s, runner)["a"])
    assert got[0] == got[1] and len(got[0]) == 8
