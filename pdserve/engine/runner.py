"""Model runner: turns a Plan into tensors, runs the forward, samples. No policy."""

from __future__ import annotations

import math
import os
import sys
import threading
import time

import numpy as np
import torch

from pdserve.engine.grammar import apply_grammar_masks
from pdserve.engine.plan import Plan, RunOutput
from pdserve.enums import AttentionBackend
from pdserve.model.attention import ExtendSeq, ForwardBatch
from pdserve.model.attention_backends import create_attention_backend, fused_elementwise
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel
from pdserve.model.sampler import apply_logit_bias, apply_penalties, gather_logprobs, sample


def kv_pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (num_pages, cfg.num_layers, 2, page_size, cfg.num_kv_heads, cfg.head_dim)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages the OS zero-fills on first touch (calloc), instead of
    torch.zeros writing every byte up front: 1.6 s for a 2 GB KV pool at startup here.
    Call `prefault` on it so the first touch does not land on requests."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


PREFAULT_ENV = "PDSERVE_KV_PREFAULT"  # 0: leave the pool to be faulted in by its first writes
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def prefault(t: torch.Tensor, chunk: int = 4 << 20) -> threading.Thread | None:
    """Back `t`'s memory with physical pages from a background thread at the lowest CPU
    priority, without changing its contents (madvise MADV_POPULATE_WRITE, so it is safe while
    the pool is in use). On this VM the first write to fresh memory costs ~2.8 s per GB
    (guest page faults that the hypervisor also has to back); left to the first requests,
    that was ~15 ms on every 256-token prompt's KV landing in pages never used before
    (docs/architecture.md, "KV pool memory"). Small chunks with a pause between them: each
    call holds the process's memory-map lock, which every other thread's mmap waits for
    (32 MB chunks started during startup made it 4-5 s slower)."""
    if os.environ.get(PREFAULT_ENV, "1") == "0" or not sys.platform.startswith("linux") or t.device.type != "cpu":
        return None
    import ctypes
    import mmap

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    lo = -(-t.data_ptr() // page) * page
    hi = (t.data_ptr() + t.numel() * t.element_size()) // page * page

    def run(keep=t) -> None:  # `keep`: the memory stays mapped while we walk it
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        for a in range(lo, hi, chunk):
            if madvise(a, min(chunk, hi - a), _MADV_POPULATE_WRITE) != 0:
                return  # older kernel: first writes fault the pages in, as before
            time.sleep(0.001)

    th = threading.Thread(target=run, name="pdserve-kv-prefault", daemon=True)
    th.start()
    return th


class ModelRunner:
    """Runs a Plan: builds the ForwardBatch, runs the model with the attention backend,
    samples. Every decision (what runs, which logprobs, which random stream) comes from
    the plan and its requests."""

    def __init__(
        self,
        model: LlamaModel,
        num_pages: int,
        page_size: int,
        kv_data: torch.Tensor | None = None,
        tp=None,
        attention_backend: AttentionBackend | str = AttentionBackend.TORCH_NATIVE,
    ) -> None:
        self.model = model
        self.cfg = model.config
        self.page_size = page_size
        shape = kv_pool_shape(self.cfg, num_pages, page_size)
        self.lazy_pool = kv_data is None  # the owner calls prefault() once serving starts
        if kv_data is None:
            kv_data = lazy_zeros(shape, model.dtype)
        elif tuple(kv_data.shape) != shape or kv_data.dtype != model.dtype:
            raise ValueError(f"kv_data must be {shape} {model.dtype}, got {tuple(kv_data.shape)} {kv_data.dtype}")
        self.kv_data = kv_data
        self.attn = create_attention_backend(attention_backend, kv_data)
        if kv_data.device.type == "cpu":
            model.use_fused_ops(fused_elementwise(attention_backend))
        self.tp = tp  # pdserve.engine.tp.TPDriver: the other ranks get every batch

    def build_batch(self, plan: Plan) -> ForwardBatch:
        page_size = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        write_pages: list[int] = []
        write_offs: list[int] = []
        logits_idx: list[int] = []
        num_decode = plan.num_decode
        dec_items = plan.items[:num_decode]
        for i, item in enumerate(dec_items):
            req = item.req
            ids.append(req.output_ids[-1] if req.output_ids else req.origin_input_ids[-1])
            positions.append(item.start)
            write_pages.append(req.pages[item.start // page_size])
            write_offs.append(item.start % page_size)
            logits_idx.append(i)
        extends: list[ExtendSeq] = []
        q = num_decode
        for item in plan.items[num_decode:]:
            req = item.req
            fill = req.fill_ids
            ids.extend(fill[item.start : item.start + item.n])
            pos = torch.arange(item.start, item.start + item.n)
            pages_t = torch.tensor(req.pages, dtype=torch.long)
            positions.extend(pos.tolist())
            write_pages.extend(pages_t[pos // page_size].tolist())
            write_offs.extend((pos % page_size).tolist())
            if item.start > 0:
                ctx = torch.arange(0, item.start + item.n)
                extends.append(ExtendSeq(q, item.n, item.start, pages_t[ctx // page_size], ctx % page_size))
            else:
                extends.append(ExtendSeq(q, item.n, 0, None, None))
            if item.sample:
                logits_idx.append(q + item.n - 1)
            q += item.n
        # input-token logprobs: logits of the chunk's prompt positions, after the sampled rows
        q = num_decode
        for item in plan.items[num_decode:]:
            logits_idx.extend(range(q, q + item.num_input_logprobs))
            q += item.n
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            write_pages=torch.tensor(write_pages, dtype=torch.long),
            write_offs=torch.tensor(write_offs, dtype=torch.long),
            num_decode=num_decode,
            extends=extends,
            # every row sampled, in order (a decode-only step): no index op on the hidden states
            logits_indices=None if logits_idx == list(range(q)) else torch.tensor(logits_idx, dtype=torch.long),
        )
        if num_decode:
            lens = [item.start + 1 for item in dec_items]
            lmax = max(lens)
            npg = -(-lmax // page_size)
            table = torch.zeros(num_decode, npg, dtype=torch.long)
            for i, item in enumerate(dec_items):
                pg = item.req.pages[: -(-lens[i] // page_size)]
                table[i, : len(pg)] = torch.tensor(pg, dtype=torch.long)
            batch.dec_table = table
            # the padding mask of torch_native's gathered decode (cpu_paged reads each request's length)
            if min(lens) != npg * page_size and self.attn.uses_dec_mask:
                pad = torch.arange(npg * page_size).unsqueeze(0) >= torch.tensor(lens).unsqueeze(1)
                batch.dec_mask = torch.zeros(num_decode, 1, npg * page_size).masked_fill_(
                    pad.view(num_decode, 1, npg * page_size), float("-inf")
                )
        return batch

    @torch.inference_mode()
    def run(self, plan: Plan) -> RunOutput:
        batch = self.build_batch(plan)
        if self.tp is not None:
            self.tp.broadcast(batch)
        logits = self.model.forward(batch, self.attn)
        reqs = [item.req for item in plan.items if item.sample]
        input_lps = self._input_logprobs(plan, logits, first_row=len(reqs))
        logits = logits[: len(reqs)]
        params = [r.sampling for r in reqs]
        if any(p.has_penalty for p in params):
            apply_penalties(logits, params, [r.token_counts for r in reqs])
        if any(p.logit_bias for p in params):
            apply_logit_bias(logits, params)
        if any(r.grammar is not None for r in reqs):
            apply_grammar_masks(logits, reqs)
        next_ids = sample(logits, params, [r.generator for r in reqs])
        out = RunOutput(next_ids, input_logprobs=input_lps)
        if any(r.return_logprob for r in reqs):
            out.logprobs, out.top_logprobs = gather_logprobs(
                logits, next_ids, [r.top_logprobs_num if r.return_logprob else 0 for r in reqs]
            )
        return out

    @staticmethod
    def _input_logprobs(plan: Plan, logits: torch.Tensor, first_row: int) -> dict[int, list[float]] | None:
        """Plan item index -> logprob of each next prompt token of that chunk (the rows
        build_batch put after the sampled ones, in plan order)."""
        out: dict[int, list[float]] = {}
        row = first_row
        for k, item in enumerate(plan.items):
            n = item.num_input_logprobs
            if n == 0:
                continue
            nxt = item.req.origin_input_ids[item.start + 1 : item.start + 1 + n]
            lp = torch.log_softmax(logits[row : row + n], dim=-1)
            out[k] = lp[torch.arange(n), torch.tensor(nxt)].tolist()
            row += n
        return out or None
