"""Attention backends by name (`--attention-backend`), and the fake one used in tests.

Like the KV transfer backends (disagg/transfer/registry.py): a base class
(`attention.BaseAttentionBackend`), a registry, and a fake that keeps the contract
(K/V written into the pool, output shaped like q) without the math.
"""

from __future__ import annotations

import logging

import torch

from pdserve.enums import AttentionBackend
from pdserve.model import cpu_kernels
from pdserve.model.attention import BaseAttentionBackend, ForwardBatch, TorchNativeAttention

logger = logging.getLogger("pdserve.attention")


class CpuPagedAttention(TorchNativeAttention):
    """Decode attention by pdserve's C++ kernel (pdserve/model/csrc/paged_attention.cpp),
    which reads each request's pages of the pool in place: no per-step gather of K/V, one
    pass over the context with an online softmax. Prefill (extend) chunks: float32 pools run
    every chunk of a step through one call of the causal extend kernel
    (pdserve/model/csrc/extend_attention.cpp), also in place; bfloat16 pools (and head sizes
    the kernel lacks) run them as TorchNativeAttention does (SDPA's flash kernel). Float32 and
    bfloat16 pools on CPU."""

    uses_dec_mask = False  # the kernel reads each request's length

    def __init__(self, kv_data: torch.Tensor) -> None:
        super().__init__(kv_data)
        if kv_data.device.type != "cpu" or kv_data.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("the cpu_paged attention backend needs a float32 or bfloat16 KV pool on the CPU")
        cpu_kernels.load()
        self._op = torch.ops.pdserve_cpu.paged_decode
        self._step = torch.ops.pdserve_cpu.paged_decode_step
        self._ext = torch.ops.pdserve_cpu.paged_extend
        self._extend_ok = kv_data.dtype == torch.float32 and bool(
            torch.ops.pdserve_cpu.paged_extend_supported(kv_data.shape[-1])
        )

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        if batch.extends or batch.num_decode != q.shape[0]:  # prefill chunks: TorchNativeAttention's path
            return super().__call__(layer, q, k, v, batch)
        # decode only: the K/V write and the attention of the whole batch in one kernel call
        if batch.write_rows is None:
            batch.write_rows = self.base_rows(batch.write_pages, batch.write_offs)
        if batch.dec_lens is None:
            batch.dec_lens = batch.positions + 1
        return self._step(
            q, k, v, self.kv_data, batch.write_rows, batch.dec_table, batch.dec_lens, layer, q.shape[-1] ** -0.5
        )

    def _extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch, out: torch.Tensor
    ) -> None:
        # every prefill chunk of the step in one kernel call that reads the pool in place
        # (pdserve/model/csrc/extend_attention.cpp); SDPA where the kernel does not apply
        if batch.ext_args is None:
            batch.ext_args = self._extend_args(batch) if self._extend_ok and q.dtype == torch.float32 else False
        if batch.ext_args is False:
            return super()._extend(q, k, v, layer, batch, out)
        tables, meta = batch.ext_args
        self._ext(q, self.kv_data, tables, meta, layer, q.shape[-1] ** -0.5, out)

    def _extend_args(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor] | bool:
        """The kernel's page tables and (q_start, q_len, prefix_len) rows for the batch's chunks,
        or False unless each chunk's context token i lies at offset i % page_size of its table's
        page i // page_size (how the runner lays requests out; tests may build other batches)."""
        ps = self.page_size
        tables = []
        for e in batch.extends:
            ctx = e.prefix_len + e.q_len
            if e.prefix_len == 0:
                pages = batch.write_pages[e.q_start : e.q_start + e.q_len]
                offs = batch.write_offs[e.q_start : e.q_start + e.q_len]
            else:
                pages, offs = e.ctx_pages, e.ctx_offs
            if pages is None or pages.numel() != ctx:
                return False
            idx = torch.arange(ctx)
            table = pages[::ps]
            if not (torch.equal(offs, idx % ps) and torch.equal(pages, table[idx // ps])):
                return False
            tables.append(table)
        width = max(t.numel() for t in tables)
        padded = torch.zeros(len(tables), width, dtype=torch.long)
        for i, t in enumerate(tables):
            padded[i, : t.numel()] = t
        meta = torch.tensor([(e.q_start, e.q_len, e.prefix_len) for e in batch.extends], dtype=torch.long)
        return padded, meta

    def _decode(self, q: torch.Tensor, layer: int, batch: ForwardBatch, out: torch.Tensor) -> None:
        # one call per layer for the whole decode batch; the kernel reads the pages where they are
        if batch.dec_lens is None:  # context length of each decode request: its position + 1
            batch.dec_lens = batch.positions[: batch.num_decode] + 1
        self._op(q, self.kv_data, batch.dec_table, batch.dec_lens, layer, q.shape[-1] ** -0.5, out)


class FakeAttention(BaseAttentionBackend):
    """Writes the new K/V into the pool like a real backend and returns q as the output:
    for tests of what surrounds attention (runner, scheduler, KV transfer), where the
    attention math is beside the point."""

    def __init__(self, kv_data: torch.Tensor) -> None:
        super().__init__(kv_data)
        _, num_layers, _, self.page_size, heads, dim = kv_data.shape
        self.rows = kv_data.view(-1, heads, dim)  # row of (page, layer, k|v, offset), as in TorchNativeAttention
        self.page_stride = num_layers * 2 * self.page_size

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        rows = batch.write_pages * self.page_stride + batch.write_offs + layer * 2 * self.page_size
        self.rows.index_copy_(0, rows, k)
        self.rows.index_copy_(0, rows + self.page_size, v)
        return q.clone()


_BACKENDS: dict[AttentionBackend, type[BaseAttentionBackend]] = {
    AttentionBackend.TORCH_NATIVE: TorchNativeAttention,
    AttentionBackend.CPU_PAGED: CpuPagedAttention,
    AttentionBackend.FAKE: FakeAttention,
}


def resolve_attention_backend(name: AttentionBackend | str, kv_data: torch.Tensor) -> AttentionBackend:
    """`auto` -> cpu_paged for a float32 pool on the CPU whose kernel builds here (measured
    faster than torch_native in every decode shape, docs/benchmarks.md), else torch_native
    (with a warning when the kernel failed to build). bfloat16 stays on torch_native: with the
    kernel, greedy agreement with transformers' bf16 fell from 19/20 to 15/20 full answers
    (tests/e2e/test_bf16_agreement.py), as it keeps the softmax weights in float32 where SDPA's
    flash kernel, which transformers runs, rounds them to bf16. Other names stay."""
    try:
        backend = AttentionBackend(name)
    except ValueError:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {[b.value for b in AttentionBackend]}"
        ) from None
    if backend != AttentionBackend.AUTO:
        return backend
    if kv_data.device.type != "cpu" or kv_data.dtype != torch.float32:
        return AttentionBackend.TORCH_NATIVE
    try:
        cpu_kernels.load()
    except RuntimeError as e:
        logger.warning("attention backend auto: %s; using torch_native", e)
        return AttentionBackend.TORCH_NATIVE
    return AttentionBackend.CPU_PAGED


def fused_elementwise(name: AttentionBackend | str) -> bool:
    """Whether a model served with attention backend `name` runs its element-wise work through
    the fused CPU kernels (pdserve/model/fused_ops.py; where they exist for its dtype): yes for
    `auto` and `cpu_paged`, which choose pdserve's kernels; `torch_native` (and `fake`) keep
    the whole forward in torch's ops, the portable reference. bfloat16 under `auto` gets them
    too: unlike decode attention, they round exactly as the torch form does."""
    return AttentionBackend(name) in (AttentionBackend.AUTO, AttentionBackend.CPU_PAGED)


def create_attention_backend(name: AttentionBackend | str, kv_data: torch.Tensor) -> BaseAttentionBackend:
    """The backend `name` over the KV pool `kv_data`; ValueError for an unknown name."""
    return _BACKENDS[resolve_attention_backend(name, kv_data)](kv_data)
