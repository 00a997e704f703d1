"""Torch-native paged attention over the KV pool (runs on CPU and GPU).

KV pool layout (shared with the PD transfer layer, see docs/architecture.md):
    kv_data: [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]
so one page of one request is one contiguous block of bytes.

One forward batch holds decode tokens first (one per request), then extend
(prefill) chunks. Linear layers see all tokens flattened as [T, hidden];
attention treats the decode part as one padded batch and each extend chunk on
its own (few per step under the chunked-prefill token budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ExtendSeq:
    q_start: int  # index of the chunk's first token in the flat batch
    q_len: int
    prefix_len: int  # tokens already in the pool before this chunk
    ctx_pages: torch.Tensor | None  # [prefix_len + q_len] page of each context token
    ctx_offs: torch.Tensor | None  # [prefix_len + q_len] offset within the page
    ctx_rows: torch.Tensor | None = None  # derived by the backend, cached across layers


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    write_pages: torch.Tensor  # [T] page receiving each new token's KV
    write_offs: torch.Tensor  # [T]
    num_decode: int = 0  # decode tokens occupy [0, num_decode)
    dec_pages: torch.Tensor | None = None  # [B, Lmax] context gather indices (padded)
    dec_offs: torch.Tensor | None = None  # [B, Lmax]
    dec_mask: torch.Tensor | None = None  # [B, 1, 1, Lmax] float additive (0 / -inf), None when all equal
    extends: list[ExtendSeq] = field(default_factory=list)
    logits_indices: torch.Tensor | None = None  # [N] flat indices whose logits are needed
    write_rows: torch.Tensor | None = None  # derived by the backend, cached across layers
    dec_rows: torch.Tensor | None = None


class TorchNativeAttention:
    """Attention backend: writes the new K/V into the pool, then attends.

    All pool reads and writes go through one contiguous row view
    `kv_data.view(-1, H, D)`: the row of (page p, layer l, k|v, offset o) is
    ((p * L + l) * 2 + kv) * page_size + o. (Advanced indexing of the strided
    per-layer view made torch copy the whole pool on every write.)
    """

    def __init__(self, kv_data: torch.Tensor) -> None:
        self.kv_data = kv_data
        _, self.num_layers, _, self.ps, h, d = kv_data.shape
        self.rows = kv_data.view(-1, h, d)
        self.page_stride = self.num_layers * 2 * self.ps

    def base_rows(self, pages: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Row of the K entry of layer 0; add layer * 2 * page_size (+ page_size for V)."""
        return pages * self.page_stride + offs

    def _decode(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                 fb: ForwardBatch) -> torch.Tensor:
        """One query per request against its padded context, as two batched matmuls
        (measured several times faster than SDPA's CPU kernel for q_len = 1)."""
        B, hq, d = q.shape
        L = k_rows.shape[1]
        hkv = self.rows.shape[1]
        g = hq // hkv
        k = self.rows.index_select(0, k_rows.view(-1)).view(B, L, hkv, d)
        v = self.rows.index_select(0, v_rows.view(-1)).view(B, L, hkv, d)
        scores = torch.matmul(q.view(B, hkv, g, d), k.permute(0, 2, 3, 1)).float()  # [B, Hkv, G, L]
        scores.mul_(d ** -0.5)
        if fb.dec_mask is not None:
            scores.add_(fb.dec_mask)
        p = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(p, v.transpose(1, 2)).view(B, hq, d)  # [B, Hkv, G, D] -> [B, Hq, D]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 fb: ForwardBatch) -> torch.Tensor:
        # q: [T, Hq, D], k/v: [T, Hkv, D] -> out [T, Hq, D]
        rows, lk = self.rows, layer * 2 * self.ps
        if fb.write_rows is None:
            fb.write_rows = self.base_rows(fb.write_pages, fb.write_offs)
        rows.index_copy_(0, fb.write_rows + lk, k)
        rows.index_copy_(0, fb.write_rows + (lk + self.ps), v)
        out = torch.empty_like(q)
        nd = fb.num_decode
        if nd:
            if fb.dec_rows is None:
                fb.dec_rows = self.base_rows(fb.dec_pages, fb.dec_offs)
            out[:nd] = self._decode(q[:nd], fb.dec_rows + lk, fb.dec_rows + (lk + self.ps), fb)
        for e in fb.extends:
            s, n = e.q_start, e.q_len
            qe = q[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if e.prefix_len == 0:
                ke = k[s:s + n].transpose(0, 1).unsqueeze(0)
                ve = v[s:s + n].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qe, ke, ve, is_causal=True, enable_gqa=True)
            else:
                if e.ctx_rows is None:
                    e.ctx_rows = self.base_rows(e.ctx_pages, e.ctx_offs)
                ke = rows.index_select(0, e.ctx_rows + lk).transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
                ve = rows.index_select(0, e.ctx_rows + (lk + self.ps)).transpose(0, 1).unsqueeze(0)
                ctx = e.prefix_len + n
                qpos = torch.arange(e.prefix_len, ctx).unsqueeze(1)
                mask = torch.arange(ctx).unsqueeze(0) <= qpos  # [n, ctx]
                o = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask, enable_gqa=True)
            out[s:s + n] = o.squeeze(0).transpose(0, 1)
        return out
