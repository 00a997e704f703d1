"""Tensor-parallel head mapping and page gather/scatter between KV buffers.

An instance with tp size T splits its H KV heads as evenly as they go: rank r holds global
heads [r*H//T, (r+1)*H//T) (H=3, T=2: [0, 1) and [1, 3); SGLang requires T to divide H,
pdserve also runs the default model's 3 KV heads on 2 ranks). When prefill and decode use different tp sizes, a prefill rank sends
each overlapping decode rank the heads they share; those heads are a strided slice of every
page, so they go through a contiguous staging tensor (gather on the sender, scatter on the
receiver). With equal tp sizes the slice is the whole page and no staging is needed.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from pdserve.model.tp import head_range  # noqa: F401 (the transfer layer's name for it)


HUGE_PAGE = 2 << 20
SMALL_LIST = 64  # page lists up to this long are walked in Python (faster than numpy's set-up)


def host_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU buffer of at least `nbytes` for staging, in anonymous memory asked to use
    transparent huge pages (MADV_HUGEPAGE, where the kernel offers them): a fresh 4 KiB-page
    buffer costs a page fault per 4 KiB on first touch (measured ~2.8 s per GB here), which
    a grown staging buffer pays inside the transfer that grew it. The tensor keeps the
    mapping alive (it holds the buffer it was made from)."""
    size = max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mem.madvise(advice)
        except OSError:
            pass  # no THP in this kernel: plain pages
    return torch.frombuffer(mem, dtype=torch.uint8)


class StagingPool:
    """Staging buffers shared by one side's transfer threads, never waited for: a thread takes
    a free buffer or makes a new one, and gives it back when its write is done. Transfers one
    after another reuse one buffer whose pages are already faulted in (a buffer per
    connection, grown per request, paid the faults once per connection and size); at most as
    many buffers exist as writes ran at once. No thread ever blocks on another's buffer, so
    two sides' threads cannot wait on each other through it. A write that raised does not
    give its buffer back (an engine call may still be using it).

    CPU buffers are `capacity` bytes of virtual memory (host_buffer: huge pages where the
    kernel offers them), touched only as far as writes reach."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []
        self.made = 0  # buffers allocated so far (tests, debugging)

    @contextmanager
    def take(self, nbytes: int) -> Iterator[torch.Tensor]:
        if not (0 < nbytes <= self.capacity):
            raise ValueError(f"staging request of {nbytes} bytes outside (0, {self.capacity}]")
        with self._lock:
            buf = self._free.pop() if self._free else None
            if buf is None:
                self.made += 1
        if buf is None:
            if self.device.type == "cpu":
                buf = host_buffer(self.capacity)
            else:
                buf = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        yield buf[:nbytes]
        # only after a write that ended normally: after an error an engine call may still be
        # filling or reading the buffer (a gloo recv whose wait timed out), so it is dropped
        with self._lock:
            self._free.append(buf)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def peer_ranks(rank: int, tp_size: int, peer_tp_size: int, total_heads: int) -> list[int]:
    """Ranks of the other instance (tp size `peer_tp_size`) sharing at least one head with `rank`."""
    mine = head_range(rank, tp_size, total_heads)
    return [p for p in range(peer_tp_size) if _overlap(mine, head_range(p, peer_tp_size, total_heads))]


def slice_mapping(
    prefill_rank: int, prefill_tp: int, decode_rank: int, decode_tp: int, total_heads: int
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(prefill-local heads, decode-local heads) the two ranks share, or None."""
    p = head_range(prefill_rank, prefill_tp, total_heads)
    d = head_range(decode_rank, decode_tp, total_heads)
    ov = _overlap(p, d)
    if ov is None:
        return None
    return (ov[0] - p[0], ov[1] - p[0]), (ov[0] - d[0], ov[1] - d[0])


def paired_runs(src_pages: np.ndarray, dst_pages: np.ndarray) -> list[tuple[int, int, int]]:
    """Split aligned page lists into runs (src_start, dst_start, n) contiguous on both sides."""
    n = len(src_pages)
    if n == 0:
        return []
    if n <= SMALL_LIST:  # a plain loop: numpy's fixed costs dominate a few pages
        src, dst = np.asarray(src_pages).tolist(), np.asarray(dst_pages).tolist()
        runs, start = [], 0
        for i in range(1, n + 1):
            if i == n or src[i] != src[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
                runs.append((int(src[start]), int(dst[start]), i - start))
                start = i
        return runs
    brk = np.flatnonzero((np.diff(src_pages) != 1) | (np.diff(dst_pages) != 1)) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [n]))
    return [(int(src_pages[s]), int(dst_pages[s]), int(e - s)) for s, e in zip(starts, ends)]


def page_runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Ascending contiguous runs (start, n) of a page list, in list order."""
    return [(s, n) for s, _, n in paired_runs(pages, pages)]


def staging_view(staging: torch.Tensor, kv: torch.Tensor, npages: int, heads: tuple[int, int]) -> torch.Tensor:
    """The first bytes of a uint8 staging buffer seen as [npages, L, 2, ps, h, D] of kv's dtype."""
    shape = (npages, kv.shape[1], 2, kv.shape[3], heads[1] - heads[0], kv.shape[5])
    nbytes = int(np.prod(shape)) * kv.element_size()
    if nbytes > staging.numel():
        raise ValueError(f"staging buffer of {staging.numel()} bytes is smaller than {nbytes}")
    return staging[:nbytes].view(kv.dtype).view(shape)


def gather_pages(kv: torch.Tensor, pages: np.ndarray, heads: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """Copy heads [h0, h1) of `pages` into contiguous `out` [n, L, 2, ps, h, D] (one strided copy)."""
    src = kv[:, :, :, :, heads[0] : heads[1], :]
    idx = torch.from_numpy(np.ascontiguousarray(pages, dtype=np.int64)).to(kv.device)
    if out.device != kv.device:
        out.copy_(src.index_select(0, idx))
    else:
        torch.index_select(src, 0, idx, out=out)
    return out


def scatter_pages(kv: torch.Tensor, pages: np.ndarray, heads: tuple[int, int], src: torch.Tensor) -> None:
    """Write contiguous `src` [n, L, 2, ps, h, D] into heads [h0, h1) of `pages` of kv."""
    dst = kv[:, :, :, :, heads[0] : heads[1], :]
    idx = torch.from_numpy(np.ascontiguousarray(pages, dtype=np.int64)).to(kv.device)
    dst.index_copy_(0, idx, src.to(kv.device, non_blocking=False))


def _page_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU pool as a [num_pages, page_nbytes] uint8 array sharing its memory."""
    return t.view(-1).view(torch.uint8).numpy().reshape(t.shape[0], -1)


def copy_pages(
    src: torch.Tensor,
    src_pages: np.ndarray,
    src_heads: tuple[int, int],
    dst: torch.Tensor,
    dst_pages: np.ndarray,
    dst_heads: tuple[int, int],
) -> None:
    """dst[dst_pages, ..., dst_heads, :] = src[src_pages, ..., src_heads, :] with one copy of
    the bytes: one copy per run of pages contiguous on both sides.

    Whole CPU pages are copied as bytes with numpy (one thread, a plain memcpy per run): on a
    busy machine torch's multi-threaded copy stalls whenever one of its threads is descheduled
    (measured 2-5x slower than this under load on 2 cores, equal when idle). Head slices and
    device tensors use torch's strided copy.
    """
    s_full = src_heads == (0, src.shape[4])
    d_full = dst_heads == (0, dst.shape[4])
    runs = paired_runs(src_pages, dst_pages)
    if (
        s_full
        and d_full
        and src.device.type == "cpu"
        and dst.device.type == "cpu"
        and src.dtype == dst.dtype
        and src[0].shape == dst[0].shape
    ):
        sb, db = _page_bytes(src), _page_bytes(dst)
        for s, d, n in runs:
            np.copyto(db[d : d + n], sb[s : s + n])
        return
    for s, d, n in runs:
        a = src[s : s + n] if s_full else src[s : s + n, :, :, :, src_heads[0] : src_heads[1], :]
        b = dst[d : d + n] if d_full else dst[d : d + n, :, :, :, dst_heads[0] : dst_heads[1], :]
        b.copy_(a)
