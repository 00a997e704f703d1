"""The fused CPU element-wise kernels (pdserve/model/csrc/elementwise.cpp, fused_ops.py) against
the torch forms they replace in LlamaModel.forward: bitwise where the rounding order allows (the
greedy output is compared token for token with transformers, and PD with mode null), within one
float32 ulp of the SiLU otherwise; and the whole forward with and without them."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner
from pdserve.engine.scheduler import Scheduler
from pdserve.enums import AttentionBackend
from pdserve.model.attention_backends import fused_elementwise
from pdserve.model.config import ModelConfig
from pdserve.model.fused_ops import fused_ops_for
from pdserve.model.llama import LlamaModel, apply_rope, rms_norm
from pdserve.sampling_params import SamplingParams

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def fo():
    ops = fused_ops_for(torch.device("cpu"), torch.float32)
    if ops is None:
        pytest.skip("pdserve's CPU kernels do not build here")
    return ops


def rnd(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 576), (7, 577), (256, 576), (3, 5), (33, 33), (5, 2048), (64, 1000), (2, 4096)])
def test_add_rms_norm_is_bitwise_the_torch_form(fo, dtype, rows, n):
    h, a = rnd(rows, n, dtype=dtype, scale=3, seed=1), rnd(rows, n, dtype=dtype, seed=2)
    w = 1 + rnd(n, dtype=dtype, scale=0.1, seed=3)
    ref_h = h + a
    ref = rms_norm(ref_h, w, 1e-5)
    got = fo.add_rms_norm(h, a, w, 1e-5)
    assert torch.equal(h, ref_h)  # the residual stream is updated in place, rounded as `h += a`
    assert torch.equal(got, ref)
    assert torch.equal(fo.rms_norm(ref_h, w, 1e-6), rms_norm(ref_h, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_on_strided_rows(fo, dtype):
    big = rnd(9, 700, dtype=dtype, scale=2, seed=4)
    x = big[:, 50:626]  # row stride 700
    w = 1 + rnd(576, dtype=dtype, scale=0.1, seed=5)
    assert torch.equal(fo.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 1536), (9, 1536), (256, 64), (4, 1537), (3, 7), (17, 100)])
def test_silu_mul(fo, dtype, rows, inter):
    gu = rnd(rows, 2 * inter, dtype=dtype, scale=4, seed=6)
    ref = F.silu(gu[:, :inter])
    ref *= gu[:, inter:]
    got = fo.silu_mul(gu)
    assert got.shape == ref.shape and got.dtype == dtype
    if inter % 32 == 0 or dtype == torch.bfloat16:
        assert torch.equal(got, ref)
    else:  # torch's scalar tail uses libm's exp, its vector loop SLEEF's: 1 ulp of the SiLU at most
        torch.testing.assert_close(got, ref, rtol=3e-7, atol=1e-7)


def _avx2_without_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return False
    return {"avx2", "fma"} <= flags and "avx512f" not in flags


@pytest.mark.parametrize("inter", [1536, 100, 7, 17, 40])
def test_silu_mul_float32_is_bitwise_for_any_width_on_avx2(fo, inter):
    """AVX2-only CPUs (session 8, AMD Zen 3): the kernel splits each row as torch's AVX2 SiLU
    does (SLEEF over whole 16-element steps, libm's exp over the rest), so no tail differs."""
    if not _avx2_without_avx512():
        pytest.skip("for AVX2 CPUs without AVX-512")
    gu = rnd(5, 2 * inter, dtype=torch.float32, scale=4, seed=7)
    ref = F.silu(gu[:, :inter])
    ref *= gu[:, inter:]
    assert torch.equal(fo.silu_mul(gu), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d,rows", [(9, 3, 64, 37), (4, 2, 16, 1), (3, 1, 6, 5)])
def test_rope_qk_in_place_is_bitwise_apply_rope(fo, dtype, heads, kv_heads, d, rows):
    width = (heads + 2 * kv_heads) * d
    qkv = rnd(rows, width, dtype=dtype, scale=3, seed=7)
    pos = torch.randint(0, 500, (rows,), generator=torch.Generator().manual_seed(8))
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(512).float()[:, None] * inv[None]
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    n = heads + kv_heads
    ref = apply_rope(qkv[:, : n * d].view(rows, n, d), cos[pos][:, None], sin[pos][:, None])
    x = qkv.clone()
    fo.rope_qk_(x, pos, cos, sin, n)
    assert torch.equal(x[:, : n * d].view(rows, n, d), ref)
    assert torch.equal(x[:, n * d :], qkv[:, n * d :])  # v is left alone


def int8_rows(x):  # linears.int8_linear's per-row quantization of its input
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.round(xf / scale).to(torch.int8), scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 576), (37, 577), (5, 33)])
def test_fused_int8_quantization_is_bitwise_int8_linears(fo, dtype, rows, n):
    h, a = rnd(rows, n, dtype=dtype, scale=3, seed=10), rnd(rows, n, dtype=dtype, seed=11)
    w = 1 + rnd(n, dtype=dtype, scale=0.1, seed=12)
    h[0] = 0  # an all-zero row: the 1e-12 scale floor
    a[0] = 0
    x, (q, scale) = fo.add_rms_norm(h, a, w, 1e-5, quant=True)
    ref_q, ref_scale = int8_rows(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    gu = rnd(rows, 2 * n, dtype=dtype, scale=4, seed=13)
    act, (q, scale) = fo.silu_mul(gu, quant=True)
    ref_q, ref_scale = int8_rows(act)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_dequant_is_bitwise_int8_linears(fo, dtype):
    g = torch.Generator().manual_seed(14)
    acc = torch.randint(-(2**30), 2**30, (40, 99), generator=g, dtype=torch.int32)  # 40 rows, 37 used
    x_scale = torch.rand(37, 1, generator=g) / 50
    w_scale = torch.rand(99, generator=g) / 50
    ref = (acc[:37].float() * x_scale * w_scale).to(dtype)
    assert torch.equal(fo.int8_dequant(acc, x_scale, w_scale, 37, dtype), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 576), (37, 576), (5, 33)])
def test_int32_sums_consumed_on_the_fly_are_bitwise_dequant_then_op(fo, dtype, rows, n):
    """--quantization w8a8_int8 hands o_proj's, gate_up's and down_proj's int32 sums to the next
    fused op (Int8Sums): the results equal int8_dequant followed by the op, bit for bit, padding
    rows of the sums ignored; int8_quant equals int8_linear's quantization of its input."""
    from pdserve.model.fused_ops import Int8Sums

    g = torch.Generator().manual_seed(15)

    def sums(cols):
        acc = torch.randint(-(2**20), 2**20, (rows + 3, cols), generator=g, dtype=torch.int32)
        return Int8Sums(acc, torch.rand(rows, 1, generator=g) / 3000, torch.rand(cols, generator=g) / 3000, rows)

    h = rnd(rows, n, dtype=dtype, scale=3, seed=16)
    w = 1 + rnd(n, dtype=dtype, scale=0.1, seed=17)
    s = sums(n)
    h_ref = h.clone()
    ref = fo.add_rms_norm(h_ref, fo.int8_dequant(s.acc, s.x_scale, s.w_scale, rows, dtype), w, 1e-5, quant=True)
    got = fo.add_rms_norm_i32(h, s, w, 1e-5, quant=True)
    assert torch.equal(h, h_ref) and torch.equal(got[0], ref[0])
    assert torch.equal(got[1][0], ref[1][0]) and torch.equal(got[1][1], ref[1][1])
    assert torch.equal(s.dequant(dtype), fo.int8_dequant(s.acc, s.x_scale, s.w_scale, rows, dtype))
    s = sums(2 * n)
    act, (q, scale) = fo.silu_mul_i32(s, dtype, quant=True)
    ref_act, (ref_q, ref_scale) = fo.silu_mul(s.dequant(dtype), quant=True)
    assert torch.equal(act, ref_act) and torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    one = s.select(torch.tensor([rows - 1]))
    assert torch.equal(fo.silu_mul_i32(one, dtype), ref_act[rows - 1 :])
    x = rnd(rows, n, dtype=dtype, scale=2, seed=18)
    x[0] = 0
    q, scale = fo.int8_quant(x)
    ref_q, ref_scale = int8_rows(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


def test_bad_inputs_are_refused(fo):
    ops = torch.ops.pdserve_cpu
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="shapes differ"):
        ops.rms_norm(x, None, torch.ones(7), 1e-5, 8, torch.empty(4, 8))
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.rms_norm(x, None, torch.ones(8, dtype=torch.float64), 1e-5, 8, torch.empty(4, 8))
    with pytest.raises(RuntimeError, match="shapes differ"):
        ops.silu_mul(torch.randn(4, 9), torch.empty(4, 4))
    with pytest.raises(RuntimeError, match="go together"):
        ops.silu_mul(torch.randn(4, 8), torch.empty(4, 4), torch.empty(4, 4, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm(
            x,
            None,
            torch.ones(8),
            1e-5,
            8,
            torch.empty(4, 8),
            torch.empty(4, 8, dtype=torch.int8),
            torch.empty(4, 1, dtype=torch.float64),
        )
    acc = torch.zeros(4, 8, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="acc int32"):
        ops.rms_norm_i32(x, acc.float(), torch.ones(4, 1), torch.ones(8), torch.ones(8), 1e-5, 8, torch.empty(4, 8))
    with pytest.raises(RuntimeError, match="x_scale float32"):
        ops.silu_mul_i32(acc, torch.ones(3, 1), torch.ones(8), torch.empty(4, 4))
    with pytest.raises(RuntimeError, match="w_scale float32"):
        ops.silu_mul_i32(acc, torch.ones(4, 1), torch.ones(7), torch.empty(4, 4))
    with pytest.raises(RuntimeError, match="int8 shaped like"):
        ops.int8_quant(x, torch.empty(4, 7, dtype=torch.int8), torch.empty(4, 1))
    cos = torch.ones(10, 4)
    with pytest.raises(RuntimeError, match="out of the table"):
        ops.rope_qk(torch.randn(2, 8), torch.tensor([0, 10]), cos, cos, 2)
    with pytest.raises(RuntimeError, match="exceeds a row"):
        ops.rope_qk(torch.randn(2, 8), torch.tensor([0, 1]), cos, cos, 3)


def test_only_cpu_float32_and_bfloat16_get_fused_ops():
    assert fused_ops_for(torch.device("meta"), torch.float32) is None
    assert fused_ops_for(torch.device("cpu"), torch.float16) is None
    assert fused_elementwise("auto") and fused_elementwise(AttentionBackend.CPU_PAGED)
    assert not fused_elementwise("torch_native") and not fused_elementwise("fake")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("int8", [False, True])
def test_forward_with_fused_ops_is_bitwise_the_torch_forward(fo, dtype, arch, int8):
    """Every step of a real schedule (chunked prefills next to decodes): the same logits and the
    same K/V written, with the fused ops and with torch's."""
    cfg = ModelConfig.tiny(hidden_size=64, intermediate_size=96, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    m = LlamaModel(cfg, dtype, int8_linears=int8)
    m.init_random(seed=3)
    s = Scheduler(PageAllocator(64, 4), max_running_requests=4, chunked_prefill_size=8, context_length=256, eos_ids=())
    runner = ModelRunner(m, 64, 4, attention_backend="auto")
    assert m.fused_ops is not None
    g = torch.Generator().manual_seed(4)
    for i, n in enumerate((11, 5, 19)):
        prompt = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
        s.add_request(Req(f"r{i}", prompt, SamplingParams(max_new_tokens=6, temperature=0)))
    steps = mixed = 0
    while s.has_work():
        plan = s.schedule()
        mixed += 0 < plan.num_decode < len(plan.items)
        kv_before = runner.kv_data.clone()
        m.use_fused_ops(False)
        ref_kv = kv_before.clone()
        ref = m.forward(runner.build_batch(plan), type(runner.attn)(ref_kv))
        m.use_fused_ops(True)
        got = m.forward(runner.build_batch(plan), runner.attn)
        assert torch.equal(got, ref), f"step {steps}"
        assert torch.equal(runner.kv_data, ref_kv), f"step {steps}"
        runner.kv_data.copy_(kv_before)
        s.update(plan, runner.run(plan))
        steps += 1
    assert steps > 6 and mixed > 0
