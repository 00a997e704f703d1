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

import abc
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
    dec_table: torch.Tensor | None = None  # [B, pages_per_req] KV pages of each decode request (padded with page 0)
    dec_mask: torch.Tensor | None = None  # [B, 1, pages_per_req * page_size] additive (0 / -inf); None when all full
    extends: list[ExtendSeq] = field(default_factory=list)
    logits_indices: torch.Tensor | None = None  # [N] flat indices whose logits are needed
    write_rows: torch.Tensor | None = None  # derived by the backend, cached across layers
    dec_chunks: torch.Tensor | None = None
    dec_lens: torch.Tensor | None = None  # [B] context length of each decode request (derived)
    # (tables [S, pages], meta [S, 3]) of the paged extend kernel, or False where the chunks'
    # pages are not laid out as it reads them (derived by cpu_paged, cached across layers)
    ext_args: tuple[torch.Tensor, torch.Tensor] | bool | None = None


class BaseAttentionBackend(abc.ABC):
    """An attention backend (`--attention-backend`, pdserve/model/attention_backends.py):
    owns the paged KV pool's view, writes each layer's new K/V into it, then attends."""

    # whether decode attention reads ForwardBatch.dec_mask (the runner builds it only then)
    uses_dec_mask = True

    def __init__(self, kv_data: torch.Tensor) -> None:
        self.kv_data = kv_data  # [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]

    @abc.abstractmethod
    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] (the batch's new tokens) -> out [T, Hq, D]."""


class TorchNativeAttention(BaseAttentionBackend):
    """Attention backend: writes the new K/V into the pool, then attends.

    All pool reads and writes go through one contiguous row view
    `kv_data.view(-1, H, D)`: the row of (page p, layer l, k|v, offset o) is
    ((p * L + l) * 2 + kv) * page_size + o. (Advanced indexing of the strided
    per-layer view made torch copy the whole pool on every write.)
    """

    def __init__(self, kv_data: torch.Tensor) -> None:
        super().__init__(kv_data)
        _, self.num_layers, _, self.page_size, h, d = kv_data.shape
        self.rows = kv_data.view(-1, h, d)
        self.page_stride = self.num_layers * 2 * self.page_size
        # one "chunk" = the K (or V) block of one page of one layer: page_size * h * d contiguous elements;
        # chunk index = (page * L + layer) * 2 + kv
        self.chunks = kv_data.view(-1, self.page_size * h * d)
        self._ws: dict[str, torch.Tensor] = {}
        self._eye: torch.Tensor | None = None

    def base_rows(self, pages: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Row of the K entry of layer 0; add layer * 2 * page_size (+ page_size for V)."""
        return pages * self.page_stride + offs

    def _workspace(self, name: str, n: int) -> torch.Tensor:
        """A reused buffer of at least n chunks: fresh multi-MB tensors every layer cost more in
        page faults than the gather itself."""
        buf = self._ws.get(name)
        if buf is None or buf.shape[0] < n:
            buf = self._ws[name] = torch.empty(max(n, 64), self.chunks.shape[1], dtype=self.chunks.dtype)
        return buf[:n]

    DECODE_GROUP = 32  # requests per gather + matmul round: their K/V stay in cache in between

    def _decode(self, q: torch.Tensor, layer: int, batch: ForwardBatch, out: torch.Tensor) -> None:
        """One query per request against its pages, written into out [B, Hq, D]. K and V are
        gathered a whole page at a time into reused buffers laid out [b, L, Hkv * D], a group
        of requests at a time; with few KV heads the scores are one batched matmul against a
        block-diagonal query (row (h, g) holds q[h, g] in the columns of KV head h), which
        needs no transposed copy of K; see docs/architecture.md."""
        B, hq, d = q.shape
        hkv = self.rows.shape[1]
        g = hq // hkv
        pages_per_req = batch.dec_table.shape[1]
        L = pages_per_req * self.page_size
        block_diag = hkv <= 4
        if block_diag and (self._eye is None or self._eye.dtype != q.dtype or self._eye.shape[1] != hkv):
            self._eye = torch.eye(hkv, dtype=q.dtype).view(1, hkv, 1, hkv, 1)
        for lo in range(0, B, self.DECODE_GROUP):
            hi = min(B, lo + self.DECODE_GROUP)
            b = hi - lo
            idx = batch.dec_chunks[lo * pages_per_req : hi * pages_per_req] + layer * 2
            k = torch.index_select(self.chunks, 0, idx, out=self._workspace("k", idx.numel())).view(b, L, hkv * d)
            v = torch.index_select(self.chunks, 0, idx + 1, out=self._workspace("v", idx.numel())).view(b, L, hkv * d)
            qg = q[lo:hi]
            if block_diag:
                qb = (qg.reshape(b, hkv, g, 1, d) * self._eye).view(b, hq, hkv * d)
                scores = torch.bmm(qb, k.transpose(1, 2)).float()  # [b, Hq, L]
            else:
                scores = torch.matmul(qg.reshape(b, hkv, g, d), k.view(b, L, hkv, d).permute(0, 2, 3, 1))
                scores = scores.float().view(b, hq, L)
            scores.mul_(d**-0.5)
            if batch.dec_mask is not None:
                scores.add_(batch.dec_mask[lo:hi])
            p = torch.softmax(scores, dim=-1).to(q.dtype)
            if block_diag:
                o = torch.bmm(p, v).view(b, hkv, g, hkv, d)  # [b, Hq, Hkv * D]: keep the diagonal blocks
                out[lo:hi] = o.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(b, hq, d)
            else:
                out[lo:hi] = torch.matmul(p.view(b, hkv, g, L), v.view(b, L, hkv, d).transpose(1, 2)).reshape(b, hq, d)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        # q: [T, Hq, D], k/v: [T, Hkv, D] -> out [T, Hq, D]
        rows, layer_row = self.rows, layer * 2 * self.page_size
        if batch.write_rows is None:
            batch.write_rows = self.base_rows(batch.write_pages, batch.write_offs)
        rows.index_copy_(0, batch.write_rows + layer_row, k)
        rows.index_copy_(0, batch.write_rows + (layer_row + self.page_size), v)
        out = torch.empty_like(q)
        num_decode = batch.num_decode
        if num_decode:
            if batch.dec_chunks is None:
                batch.dec_chunks = (batch.dec_table * (self.num_layers * 2)).view(-1)
            self._decode(q[:num_decode], layer, batch, out[:num_decode])
        if batch.extends:
            self._extend(q, k, v, layer, batch, out)
        return out

    def _extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch, out: torch.Tensor
    ) -> None:
        """Every prefill chunk of the batch (its K/V already in the pool), written into out's rows:
        SDPA's flash kernel per chunk, over the chunk's own K/V or, after a prefix, over the
        context gathered from the pool."""
        rows, layer_row = self.rows, layer * 2 * self.page_size
        for e in batch.extends:
            start, n = e.q_start, e.q_len
            qe = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if e.prefix_len == 0:
                ke = k[start : start + n].transpose(0, 1).unsqueeze(0)
                ve = v[start : start + n].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qe, ke, ve, is_causal=True, enable_gqa=True)
            else:
                if e.ctx_rows is None:
                    e.ctx_rows = self.base_rows(e.ctx_pages, e.ctx_offs)
                ke = rows.index_select(0, e.ctx_rows + layer_row).transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
                ve = rows.index_select(0, e.ctx_rows + (layer_row + self.page_size)).transpose(0, 1).unsqueeze(0)
                ctx = e.prefix_len + n
                qpos = torch.arange(e.prefix_len, ctx).unsqueeze(1)
                mask = torch.arange(ctx).unsqueeze(0) <= qpos  # [n, ctx]
                o = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask, enable_gqa=True)
            out[start : start + n] = o.squeeze(0).transpose(0, 1)
