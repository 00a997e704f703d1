"""Paged decode attention against a dense reference: every KV-head count path
(block-diagonal and per-head), batches larger than one gather group, ragged lengths,
pages scattered over the pool."""

from __future__ import annotations

import pytest
import torch

from pdserve.model.attention import ForwardBatch, TorchNativeAttention


@pytest.mark.parametrize("hkv,g", [(1, 4), (3, 3), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_matches_dense_attention(hkv, g, dtype):
    torch.manual_seed(0)
    layers, ps, d, pages = 3, 4, 16, 400
    kv = torch.randn(pages, layers, 2, ps, hkv, d).to(dtype)
    attn = TorchNativeAttention(kv)
    B = TorchNativeAttention.DECODE_GROUP + 7
    lens = [int(x) for x in torch.randint(1, 40, (B,))]
    npg = -(-max(lens) // ps)
    perm = torch.randperm(pages)
    table = torch.zeros(B, npg, dtype=torch.long)
    used = 0
    for i, n in enumerate(lens):
        k = -(-n // ps)
        table[i, :k] = perm[used : used + k]
        used += k
    pad = torch.arange(npg * ps).unsqueeze(0) >= torch.tensor(lens).unsqueeze(1)
    batch = ForwardBatch(
        input_ids=torch.zeros(B, dtype=torch.long),
        positions=torch.zeros(B, dtype=torch.long),
        write_pages=torch.zeros(B, dtype=torch.long),
        write_offs=torch.zeros(B, dtype=torch.long),
        num_decode=B,
        dec_table=table,
        dec_mask=torch.zeros(B, 1, npg * ps).masked_fill_(pad.view(B, 1, -1), float("-inf")),
    )
    batch.dec_chunks = (table * (layers * 2)).view(-1)
    q = torch.randn(B, hkv * g, d).to(dtype)
    layer = 1
    out = torch.empty_like(q)
    attn._decode(q, layer, batch, out)
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        pg = table[i, pos // ps]
        k = kv[pg, layer, 0, pos % ps].float()  # [n, hkv, d]
        v = kv[pg, layer, 1, pos % ps].float()
        qi = q[i].float().view(hkv, g, d)
        p = torch.softmax(torch.einsum("hgd,nhd->hgn", qi, k) * d**-0.5, dim=-1)
        ref = torch.einsum("hgn,nhd->hgd", p, v).reshape(hkv * g, d)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[i].float(), ref, atol=tol, rtol=tol)


def test_attention_backends_by_name_write_the_same_kv():
    """The registry builds each backend; the fake writes K/V where the real one does."""
    from pdserve.model.attention import BaseAttentionBackend
    from pdserve.model.attention_backends import FakeAttention, create_attention_backend

    pools = {name: torch.zeros(8, 2, 2, 4, 2, 8) for name in ("torch_native", "fake")}
    backends = {name: create_attention_backend(name, kv) for name, kv in pools.items()}
    assert isinstance(backends["torch_native"], TorchNativeAttention)
    assert isinstance(backends["fake"], FakeAttention) and isinstance(backends["fake"], BaseAttentionBackend)
    with pytest.raises(ValueError, match="unknown attention backend 'flashinfer'"):
        create_attention_backend("flashinfer", pools["fake"])
    torch.manual_seed(0)
    n = 6
    q, k, v = torch.randn(n, 4, 8), torch.randn(n, 2, 8), torch.randn(n, 2, 8)
    pos = torch.arange(n)
    pages = torch.tensor([5, 2])[pos // 4]
    for name, attn in backends.items():
        from pdserve.model.attention import ExtendSeq

        batch = ForwardBatch(
            torch.zeros(n, dtype=torch.long), pos, pages, pos % 4, extends=[ExtendSeq(0, n, 0, None, None)]
        )
        out = attn(1, q, k, v, batch)
        assert out.shape == q.shape, name
    assert torch.equal(pools["fake"], pools["torch_native"])
    assert torch.equal(pools["fake"][5, 1, 0, :, :, :], k[:4]) and torch.equal(pools["fake"][2, 1, 1, :2], v[4:])
    assert pools["fake"][:, 0].abs().sum() == 0  # layer 0 untouched
