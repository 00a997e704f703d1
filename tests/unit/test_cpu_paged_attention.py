"""The cpu_paged attention backend (C++ kernel reading the paged pool in place) equals
torch_native on random paged inputs: decode-only steps, mixed steps (decode rows first, then
prefill chunks with and without a cached prefix), several page sizes, pages scattered over the
pool, ragged context lengths, float32 and bfloat16. The kernel is compiled on first use
(cached under ~/.cache/pdserve/kernels or $PDSERVE_KERNEL_CACHE)."""

from __future__ import annotations

import pytest
import torch

from pdserve.model.attention import ExtendSeq, ForwardBatch
from pdserve.model.attention_backends import CpuPagedAttention, create_attention_backend

LAYERS = 3


def _step(
    ps: int,
    hkv: int,
    g: int,
    d: int,
    dec_lens: list[int],
    ext: list[tuple[int, int]],
    pages: int,
    gen: torch.Generator,
    dtype: torch.dtype,
):
    """A random step over a pool of `pages` pages: decode requests with context `dec_lens`
    (the last token is the new one), then extend chunks (prefix_len, q_len). Each request's
    pages are drawn at random from the whole pool (never page 0, the padding page)."""
    perm = (torch.randperm(pages - 1, generator=gen) + 1).tolist()

    def take(n_tokens: int) -> torch.Tensor:
        k = -(-n_tokens // ps)
        out = torch.tensor(perm[:k], dtype=torch.long)
        del perm[:k]
        return out

    ids, pos, wp, wo = [], [], [], []
    tables = [take(n) for n in dec_lens]
    for n, tab in zip(dec_lens, tables):
        ids.append(0)
        pos.append(n - 1)
        wp.append(int(tab[(n - 1) // ps]))
        wo.append((n - 1) % ps)
    extends = []
    q = len(dec_lens)
    for prefix, n in ext:
        tab = take(prefix + n)
        p = torch.arange(prefix, prefix + n)
        ids += [0] * n
        pos += p.tolist()
        wp += tab[p // ps].tolist()
        wo += (p % ps).tolist()
        ctx = torch.arange(prefix + n)
        extends.append(ExtendSeq(q, n, prefix, tab[ctx // ps], ctx % ps) if prefix else ExtendSeq(q, n, 0, None, None))
        q += n
    fb = ForwardBatch(
        torch.tensor(ids),
        torch.tensor(pos),
        torch.tensor(wp),
        torch.tensor(wo),
        num_decode=len(dec_lens),
        extends=extends,
    )
    if dec_lens:
        npg = max(len(t) for t in tables)
        fb.dec_table = torch.zeros(len(dec_lens), npg, dtype=torch.long)
        for i, t in enumerate(tables):
            fb.dec_table[i, : len(t)] = t
        if min(dec_lens) != npg * ps:
            pad = torch.arange(npg * ps).unsqueeze(0) >= torch.tensor(dec_lens).unsqueeze(1)
            fb.dec_mask = torch.zeros(len(dec_lens), 1, npg * ps).masked_fill_(
                pad.view(len(dec_lens), 1, -1), float("-inf")
            )
    T = q
    qt = torch.randn(T, hkv * g, d, generator=gen).to(dtype)
    k = torch.randn(T, hkv, d, generator=gen).to(dtype)
    v = torch.randn(T, hkv, d, generator=gen).to(dtype)
    return fb, qt, k, v


def _copy(fb: ForwardBatch) -> ForwardBatch:
    """A fresh batch (backends cache derived tensors on it)."""
    return ForwardBatch(
        fb.input_ids,
        fb.positions,
        fb.write_pages,
        fb.write_offs,
        num_decode=fb.num_decode,
        dec_table=fb.dec_table,
        dec_mask=fb.dec_mask,
        extends=[ExtendSeq(e.q_start, e.q_len, e.prefix_len, e.ctx_pages, e.ctx_offs) for e in fb.extends],
    )


@pytest.mark.parametrize("ps,hkv,g,d", [(16, 3, 3, 64), (4, 1, 4, 16), (1, 2, 2, 32), (8, 8, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paged_equals_torch_native(ps, hkv, g, d, dtype):
    gen = torch.Generator().manual_seed(ps * 100 + hkv)
    pages = 8 + 600 // ps
    pool = (torch.randn(pages, LAYERS, 2, ps, hkv, d, generator=gen) * 0.7).to(dtype)
    pools = {name: pool.clone() for name in ("torch_native", "cpu_paged")}
    backends = {name: create_attention_backend(name, p) for name, p in pools.items()}
    assert isinstance(backends["cpu_paged"], CpuPagedAttention)
    steps = [
        ([1, 2, ps, ps + 1, 37, 3 * ps], []),  # decode only, ragged, exact page boundaries
        ([5, 50], [(0, 7), (2 * ps + 3, 5), (ps, 1)]),  # mixed: decode, fresh prefill, prefix chunks
        ([], [(0, 12)]),  # prefill only
        ([64] * 5, []),  # all full length (no mask)
    ]
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for dec_lens, ext in steps:
        fb, q, k, v = _step(ps, hkv, g, d, dec_lens, ext, pages, gen, dtype)
        for layer in range(LAYERS):
            outs = {name: be(layer, q, k, v, _copy(fb)) for name, be in backends.items()}
            torch.testing.assert_close(outs["cpu_paged"].float(), outs["torch_native"].float(), atol=tol, rtol=tol)
        assert torch.equal(pools["cpu_paged"], pools["torch_native"])  # same K/V written


def test_cpu_paged_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="float32 or bfloat16 KV pool on the CPU"):
        create_attention_backend("cpu_paged", torch.zeros(4, 1, 2, 4, 1, 8, dtype=torch.float16))
    attn = create_attention_backend("cpu_paged", torch.zeros(4, 1, 2, 4, 1, 8))
    q = torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="table and lens must be contiguous int64"):
        attn._op(
            q,
            attn.kv_data,
            torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.long),
            0,
            1.0,
            torch.empty_like(q),
        )


def test_auto_picks_the_kernel_for_float32_only():
    """auto: cpu_paged for float32 pools; bfloat16 stays on torch_native (bf16 agreement with
    transformers, docs/architecture.md "CPU kernels"), as does anything not on the CPU's dtypes."""
    from pdserve.model.attention import TorchNativeAttention

    assert type(create_attention_backend("auto", torch.zeros(4, 1, 2, 4, 1, 8))) is CpuPagedAttention
    for dt in (torch.bfloat16, torch.float16):
        assert type(create_attention_backend("auto", torch.zeros(4, 1, 2, 4, 1, 8, dtype=dt))) is TorchNativeAttention
    assert (
        type(create_attention_backend("cpu_paged", torch.zeros(4, 1, 2, 4, 1, 8, dtype=torch.bfloat16)))
        is CpuPagedAttention
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_a_request_attends_the_same_alone_or_in_a_batch(threads):
    """The float32 kernel splits the work differently for one request (per query head) and for
    many (per KV head): a request's output must be the same bits either way."""
    gen = torch.Generator().manual_seed(5)
    ps, hkv, g, d, pages = 16, 3, 3, 64, 100
    pool = torch.randn(pages, LAYERS, 2, ps, hkv, d, generator=gen)
    op = create_attention_backend("cpu_paged", pool)._op
    lens = torch.tensor([37, 100, 16, 64, 1, 150, 90, 33])
    table = (torch.randperm(pages - 1, generator=gen)[: 8 * 10] + 1).view(8, 10)
    q = torch.randn(8, hkv * g, d, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.empty_like(q)
        op(q, pool, table, lens, 1, d**-0.5, out)
        for b in range(8):
            one = torch.empty_like(q[b : b + 1])
            op(q[b : b + 1].clone(), pool, table[b : b + 1].clone(), lens[b : b + 1].clone(), 1, d**-0.5, one)
            assert torch.equal(one, out[b : b + 1]), b
    finally:
        torch.set_num_threads(before)


def _extend_out(attn, q, k, v, fb, layer=1):
    out = attn(layer, q, k, v, fb)
    assert fb.ext_args not in (None, False), "the extend kernel did not run"
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_extend_kernel_gives_a_chunk_the_same_bits_alone_or_batched(threads):
    """Prefill chunks run through one extend-kernel call per layer (float32): a chunk's rows
    must not depend on the other chunks and decode rows of the step, on the thread count, or
    on how its prompt was split into chunks (PD's prefill server chunks differently from
    mode null)."""
    gen = torch.Generator().manual_seed(11)
    ps, hkv, g, d, pages = 16, 3, 3, 64, 120
    pool = torch.randn(pages, LAYERS, 2, ps, hkv, d, generator=gen)
    attn = create_attention_backend("cpu_paged", pool)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fb, q, k, v = _step(ps, hkv, g, d, [9, 40], [(0, 37), (50, 70), (16, 1)], pages, gen, torch.float32)
        together = _extend_out(attn, q, k, v, _copy(fb))
        for e in fb.extends:  # each chunk alone, with its own rows only
            rows = slice(e.q_start, e.q_start + e.q_len)
            one = ForwardBatch(
                fb.input_ids[rows],
                fb.positions[rows],
                fb.write_pages[rows],
                fb.write_offs[rows],
                extends=[ExtendSeq(0, e.q_len, e.prefix_len, e.ctx_pages, e.ctx_offs)],
            )
            alone = _extend_out(attn, q[rows].clone(), k[rows].clone(), v[rows].clone(), one)
            assert torch.equal(alone, together[rows])
        # the 70-token chunk after its 50-token prefix, split into chunks of 20, 33 and 17
        e = fb.extends[1]
        for lo, hi in ((0, 20), (20, 53), (53, 70)):
            rows = slice(e.q_start + lo, e.q_start + hi)
            ctx = torch.arange(e.prefix_len + hi)
            part = ForwardBatch(
                fb.input_ids[rows],
                fb.positions[rows],
                fb.write_pages[rows],
                fb.write_offs[rows],
                extends=[ExtendSeq(0, hi - lo, e.prefix_len + lo, e.ctx_pages[ctx], e.ctx_offs[ctx])],
            )
            assert torch.equal(
                _extend_out(attn, q[rows].clone(), k[rows].clone(), v[rows].clone(), part), together[rows]
            )
    finally:
        torch.set_num_threads(before)


def test_extend_kernel_long_context_and_fallback():
    """A long prefix (many key blocks) equals torch_native; a batch whose pages are not laid out
    as the runner lays them (token i at offset i % page_size of page i // page_size) runs SDPA
    instead, still correctly; a page index outside the pool is refused."""
    gen = torch.Generator().manual_seed(12)
    ps, hkv, g, d, pages = 16, 3, 3, 64, 60
    pool = torch.randn(pages, LAYERS, 2, ps, hkv, d, generator=gen)
    pools = {name: pool.clone() for name in ("torch_native", "cpu_paged")}
    be = {name: create_attention_backend(name, p) for name, p in pools.items()}
    fb, q, k, v = _step(ps, hkv, g, d, [3], [(600, 100), (0, 130)], pages, gen, torch.float32)
    ref = be["torch_native"](2, q, k, v, _copy(fb))
    torch.testing.assert_close(_extend_out(be["cpu_paged"], q, k, v, _copy(fb), layer=2), ref, atol=2e-5, rtol=2e-5)
    # the same context, with its first two tokens swapped between two slots of page 0
    e = fb.extends[0]
    odd = _copy(fb)
    offs = e.ctx_offs.clone()
    offs[[0, 1]] = offs[[1, 0]]
    odd.extends[0] = ExtendSeq(e.q_start, e.q_len, e.prefix_len, e.ctx_pages, offs)
    for p in pools.values():
        p[e.ctx_pages[0], 2, :, [0, 1]] = p[e.ctx_pages[0], 2, :, [1, 0]]
    got = be["cpu_paged"](2, q, k, v, odd)
    assert odd.ext_args is False
    torch.testing.assert_close(got, be["torch_native"](2, q, k, v, odd), atol=2e-5, rtol=2e-5)
    op = be["cpu_paged"]._ext
    meta = torch.tensor([[0, 4, 0]])
    with pytest.raises(RuntimeError, match="page index out of range"):
        op(q[:4], pools["cpu_paged"], torch.tensor([[pages]]), meta, 0, 0.125, torch.empty_like(q[:4]))
    with pytest.raises(RuntimeError, match="more pages than its table row has"):
        op(
            q[:40],
            pools["cpu_paged"],
            torch.tensor([[1, 2]]),
            torch.tensor([[0, 40, 0]]),
            0,
            0.125,
            torch.empty_like(q[:40]),
        )


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_extend_kernel_is_built_for_avx2_and_avx512_machines():
    """The extend kernel has an AVX-512 and an AVX2+FMA form (session 8: AMD Zen 3 has no
    AVX-512, and prefill there ran SDPA over a gathered copy of the context); on x86 CPUs with
    either, the float32 head sizes the runner meets go through it."""
    flags = _cpu_flags()
    if not ({"avx512f"} <= flags or {"avx2", "fma"} <= flags):
        pytest.skip("neither AVX-512 nor AVX2+FMA on this CPU")
    attn = create_attention_backend("cpu_paged", torch.zeros(4, 1, 2, 4, 1, 64))
    assert attn._extend_ok
    for d in (16, 32, 64, 128):
        assert torch.ops.pdserve_cpu.paged_extend_supported(d)
    assert not torch.ops.pdserve_cpu.paged_extend_supported(48)


@pytest.mark.parametrize("g,d", [(3, 128), (7, 16)])
def test_extend_kernel_other_head_shapes(g, d):
    """head_dim 128 (8 rows x 16 columns per output block) and a group of 7 query heads (a
    16-token item's 112 rows in blocks of 8 or 16, the last score block partial) equal
    torch_native."""
    gen = torch.Generator().manual_seed(13)
    ps, hkv, pages = 16, 2, 40
    pool = torch.randn(pages, LAYERS, 2, ps, hkv, d, generator=gen)
    pools = {name: pool.clone() for name in ("torch_native", "cpu_paged")}
    be = {name: create_attention_backend(name, p) for name, p in pools.items()}
    fb, q, k, v = _step(ps, hkv, g, d, [20], [(0, 29), (35, 18)], pages, gen, torch.float32)
    ref = be["torch_native"](1, q, k, v, _copy(fb))
    torch.testing.assert_close(_extend_out(be["cpu_paged"], q, k, v, _copy(fb)), ref, atol=2e-5, rtol=2e-5)
