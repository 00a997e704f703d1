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


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    write_pages: torch.Tensor  # [T] page receiving each new token's KV
    write_offs: torch.Tensor  # [T]
    num_decode: int = 0  # decode tokens occupy [0, num_decode)
    dec_pages: torch.Tensor | None = None  # [B, Lmax] context gather indices (padded)
    dec_offs: torch.Tensor | None = None  # [B, Lmax]
    dec_mask: torch.Tensor | None = None  # [B, 1, 1, Lmax] bool, None when all lengths equal
    extends: list[ExtendSeq] = field(default_factory=list)
    logits_indices: torch.Tensor | None = None  # [N] flat indices whose logits are needed


class TorchNativeAttention:
    """Attention backend: writes the new K/V into the pool, then attends."""

    def __init__(self, kv_data: torch.Tensor) -> None:
        self.kv_data = kv_data
        # per-layer strided views [num_pages, page_size, H, D]
        self.k_views = [kv_data[:, layer, 0] for layer in range(kv_data.shape[1])]
        self.v_views = [kv_data[:, layer, 1] for layer in range(kv_data.shape[1])]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 fb: ForwardBatch) -> torch.Tensor:
        # q: [T, Hq, D], k/v: [T, Hkv, D] -> out [T, Hq, D]
        kc, vc = self.k_views[layer], self.v_views[layer]
        kc[fb.write_pages, fb.write_offs] = k
        vc[fb.write_pages, fb.write_offs] = v
        out = torch.empty_like(q)
        nd = fb.num_decode
        if nd:
            qd = q[:nd].unsqueeze(2)  # [B, Hq, 1, D]
            kd = kc[fb.dec_pages, fb.dec_offs].transpose(1, 2)  # [B, Hkv, L, D]
            vd = vc[fb.dec_pages, fb.dec_offs].transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=fb.dec_mask, enable_gqa=True)
            out[:nd] = o.squeeze(2)
        for e in fb.extends:
            s, n = e.q_start, e.q_len
            qe = q[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if e.prefix_len == 0:
                ke = k[s:s + n].transpose(0, 1).unsqueeze(0)
                ve = v[s:s + n].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qe, ke, ve, is_causal=True, enable_gqa=True)
            else:
                ke = kc[e.ctx_pages, e.ctx_offs].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
                ve = vc[e.ctx_pages, e.ctx_offs].transpose(0, 1).unsqueeze(0)
                ctx = e.prefix_len + n
                qpos = torch.arange(e.prefix_len, ctx).unsqueeze(1)
                mask = torch.arange(ctx).unsqueeze(0) <= qpos  # [n, ctx]
                o = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask, enable_gqa=True)
            out[s:s + n] = o.squeeze(0).transpose(0, 1)
        return out
