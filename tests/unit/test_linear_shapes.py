"""The prepacked (oneDNN) linear layers see a bounded set of row counts (issue #10).

oneDNN caches a primitive per input shape and does not give the memory of evicted ones
back, so a prefill server that ran every new prompt length at its own row count grew its RSS
by ~1-2 MiB per new length without bound (docs/benchmarks.md, "Soak with faults"). Row
counts are now padded to a bounded set of buckets; the results are those of the unpadded
product."""

import pytest
import torch

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner
from pdserve.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.model import linears
from pdserve.model.config import ModelConfig
from pdserve.model.linears import pack_weight, packed_linear, padded_rows
from pdserve.model.llama import LlamaModel, random_state

needs_mkldnn = pytest.mark.skipif(pack_weight(torch.zeros(8, 8)) is None, reason="no oneDNN prepacked linear")


def test_padded_rows_is_bounded_and_tight():
    rows = [padded_rows(m) for m in range(1, 4097)]
    assert all(p >= m for m, p in zip(range(1, 4097), rows))
    assert all(padded_rows(m) == m for m in range(1, linears.EXACT_ROWS + 1))  # decode batches as they are
    assert max(p / m for m, p in zip(range(1, 4097), rows)) <= 1.125  # at most 12.5 % padding
    assert len(set(rows)) == linears.EXACT_ROWS + 8 * 7  # 8 buckets per doubling from 32 to 4096
    assert all(padded_rows(p) == p for p in set(rows))  # a bucket is its own bucket


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_the_plain_product(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 48, generator=g).to(dtype)
    packed = pack_weight(w)
    # None only for bf16 on CPUs without native bf16 (AVX2-only), whose oneDNN bf16 product came
    # back empty: the model then multiplies by the plain weight, which must be right too
    assert packed is not None or (
        dtype == torch.bfloat16 and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    )
    for m in (1, 7, 32, 33, 57, 100, 129):
        x = torch.randn(m, 48, generator=g).to(dtype)
        y = packed_linear(x, packed) if packed is not None else linears.linear(x, w, None, False, None)
        assert y.shape == (m, 96) and y.is_contiguous()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.float(), (x.float() @ w.float().T), rtol=tol, atol=tol)


@needs_mkldnn
def test_prefills_of_every_length_reach_onednn_at_few_row_counts(monkeypatch):
    """A model serving prompts of 1..200 tokens: the oneDNN op sees a bounded set of row
    counts (without the padding: one per prompt length, 200 of them)."""
    cfg = ModelConfig.tiny(vocab_size=300, eos_token_ids=())
    model = LlamaModel(cfg, torch.float32)
    model.load_weights(random_state(cfg))
    seen: set[int] = set()
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x, *args):
        seen.add(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    s = Scheduler(
        PageAllocator(256, 4),
        max_running_requests=4,
        chunked_prefill_size=512,
        context_length=512,
        eos_ids=(),
        disable_radix_cache=True,
    )
    runner = ModelRunner(model, 256, 4)
    for n in range(1, 201):
        s.add_request(Req(f"r{n}", [(7 * i + n) % 290 + 5 for i in range(n)], SamplingParams(max_new_tokens=1)))
        while s.has_work():
            plan = s.schedule()
            s.update(plan, runner.run(plan))
    assert seen, "the prepacked path did not run"
    assert seen <= {padded_rows(m) for m in range(1, 201)}
    assert len(seen) <= linears.EXACT_ROWS + 8 * 3  # up to 200 rows: 32 exact + 8 per doubling


@needs_mkldnn
def test_prebuilt_shapes_cover_everything_serving_meets(monkeypatch):
    """Warm-up (`prebuild_linear_shapes`, called by load_model) runs every (row count, weight)
    shape serving can meet, so no new oneDNN primitive is built while serving: RSS flat."""
    cfg = ModelConfig.tiny(vocab_size=300, eos_token_ids=())
    model = LlamaModel(cfg, torch.float32)
    model.load_weights(random_state(cfg))
    seen: set[tuple] = set()
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x, packed, *args):
        seen.add((x.shape[0], x.shape[1], tuple(packed.shape)))
        return real(x, packed, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    max_running, chunk = 4, 96
    built = model.prebuild_linear_shapes(chunk + max_running, max_running)
    assert built == len(seen) > 0
    prebuilt = set(seen)
    seen.clear()
    s = Scheduler(
        PageAllocator(512, 4),
        max_running_requests=max_running,
        chunked_prefill_size=chunk,
        context_length=512,
        eos_ids=(),
        disable_radix_cache=True,
    )
    runner = ModelRunner(model, 512, 4)
    for n in range(1, 161, 3):  # prompts longer than a chunk, several requests per step
        for j in range(3):
            s.add_request(
                Req(f"r{n}-{j}", [(7 * i + n + j) % 290 + 5 for i in range(n)], SamplingParams(max_new_tokens=3))
            )
        while s.has_work():
            plan = s.schedule()
            s.update(plan, runner.run(plan))
    assert seen, "the prepacked path did not run"
    assert seen <= prebuilt, f"shapes built while serving: {sorted(seen - prebuilt)[:5]}"
