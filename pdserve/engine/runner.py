"""Model runner: turns a Plan into tensors, runs the forward, samples. No policy."""

from __future__ import annotations

import math
import os
import sys
import threading
import time

import numpy as np
import torch

from pdserve.engine.scheduler import Plan, RunOutput
from pdserve.model.attention import ExtendSeq, ForwardBatch, TorchNativeAttention
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel
from pdserve.model.sampler import apply_logit_bias, apply_penalties, gather_logprobs, sample
from pdserve.engine.grammar import apply_grammar_masks


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
    def __init__(self, model: LlamaModel, num_pages: int, page_size: int,
                 kv_data: torch.Tensor | None = None, tp=None) -> None:
        self.model = model
        self.cfg = model.config
        self.ps = page_size
        shape = kv_pool_shape(self.cfg, num_pages, page_size)
        self.lazy_pool = kv_data is None  # the owner calls prefault() once serving starts
        if kv_data is None:
            kv_data = lazy_zeros(shape, model.dtype)
        elif tuple(kv_data.shape) != shape or kv_data.dtype != model.dtype:
            raise ValueError(f"kv_data must be {shape} {model.dtype}, got {tuple(kv_data.shape)} {kv_data.dtype}")
        self.kv_data = kv_data
        self.attn = TorchNativeAttention(kv_data)
        self.tp = tp  # pdserve.engine.tp.TPDriver: the other ranks get every batch

    def build_batch(self, plan: Plan) -> ForwardBatch:
        ps = self.ps
        ids: list[int] = []
        pos: list[int] = []
        wp: list[int] = []
        wo: list[int] = []
        logits_idx: list[int] = []
        nd = plan.num_decode
        dec_items = plan.items[:nd]
        for i, it in enumerate(dec_items):
            r = it.req
            ids.append(r.output_ids[-1] if r.output_ids else r.origin_input_ids[-1])
            pos.append(it.start)
            wp.append(r.pages[it.start // ps])
            wo.append(it.start % ps)
            logits_idx.append(i)
        fb_extends: list[ExtendSeq] = []
        q = nd
        for it in plan.items[nd:]:
            r = it.req
            fill = r.fill_ids
            ids.extend(fill[it.start: it.start + it.n])
            p = torch.arange(it.start, it.start + it.n)
            pages_t = torch.tensor(r.pages, dtype=torch.long)
            pos.extend(p.tolist())
            wp.extend(pages_t[p // ps].tolist())
            wo.extend((p % ps).tolist())
            if it.start > 0:
                ctx = torch.arange(0, it.start + it.n)
                fb_extends.append(ExtendSeq(q, it.n, it.start, pages_t[ctx // ps], ctx % ps))
            else:
                fb_extends.append(ExtendSeq(q, it.n, 0, None, None))
            if it.sample:
                logits_idx.append(q + it.n - 1)
            q += it.n
        # input-token logprobs (return_logprob, first pass over the prompt): logits of every
        # prompt position of the chunk, after the sampled rows
        self.input_lp_rows: list[tuple[int, int, list[int]]] = []  # (item, first row, next tokens)
        q = nd
        for k, it in enumerate(plan.items[nd:], start=nd):
            r = it.req
            n_in = len(r.origin_input_ids)
            if r.return_logprob and r.num_retractions == 0 and it.start < n_in - 1:
                end = min(it.start + it.n, n_in - 1)
                self.input_lp_rows.append((k, len(logits_idx), r.origin_input_ids[it.start + 1: end + 1]))
                logits_idx.extend(range(q, q + end - it.start))
            q += it.n
        fb = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            write_pages=torch.tensor(wp, dtype=torch.long),
            write_offs=torch.tensor(wo, dtype=torch.long),
            num_decode=nd,
            extends=fb_extends,
            logits_indices=torch.tensor(logits_idx, dtype=torch.long),
        )
        if nd:
            lens = [it.start + 1 for it in dec_items]
            lmax = max(lens)
            npg = -(-lmax // ps)
            table = torch.zeros(nd, npg, dtype=torch.long)
            for i, it in enumerate(dec_items):
                pg = it.req.pages[: -(-lens[i] // ps)]
                table[i, : len(pg)] = torch.tensor(pg, dtype=torch.long)
            fb.dec_table = table
            if min(lens) != npg * ps:
                pad = torch.arange(npg * ps).unsqueeze(0) >= torch.tensor(lens).unsqueeze(1)
                fb.dec_mask = torch.zeros(nd, 1, npg * ps).masked_fill_(pad.view(nd, 1, npg * ps), float("-inf"))
        return fb

    @torch.inference_mode()
    def run(self, plan: Plan) -> RunOutput:
        fb = self.build_batch(plan)
        if self.tp is not None:
            self.tp.broadcast(fb)
        logits = self.model.forward(fb, self.attn)
        input_lps = None
        if self.input_lp_rows:
            input_lps = {}
            for k, row, nxt in self.input_lp_rows:
                lp = torch.log_softmax(logits[row: row + len(nxt)], dim=-1)
                input_lps[k] = lp[torch.arange(len(nxt)), torch.tensor(nxt)].tolist()
        reqs = [it.req for it in plan.items if it.sample]
        logits = logits[: len(reqs)]
        params = [r.sampling for r in reqs]
        if any(p.has_penalty for p in params):
            apply_penalties(logits, params, [r.token_counts for r in reqs])
        if any(p.logit_bias for p in params):
            apply_logit_bias(logits, params)
        if any(r.grammar is not None for r in reqs):
            apply_grammar_masks(logits, reqs)
        gens = []
        for r in reqs:
            if r.sampling.seed is not None and r.generator is None:
                r.generator = torch.Generator().manual_seed(r.sampling.seed)
            gens.append(r.generator)
        next_ids = sample(logits, params, gens)
        out = RunOutput(next_ids, input_logprobs=input_lps)
        if any(r.return_logprob for r in reqs):
            out.logprobs, out.top_logprobs = gather_logprobs(
                logits, next_ids, [r.top_logprobs_num if r.return_logprob else 0 for r in reqs])
        return out
