"""Tensor-parallel head mapping and the gather/scatter/copy helpers on real buffers."""

import numpy as np
import pytest
import torch

from pdserve.disagg.transfer.heads import (
    HUGE_PAGE,
    StagingPool,
    copy_pages,
    gather_pages,
    head_range,
    host_buffer,
    paired_runs,
    peer_ranks,
    scatter_pages,
    slice_mapping,
    staging_view,
)

H = 8  # total KV heads


def test_head_ranges():
    assert [head_range(r, 4, H) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [head_range(r, 3, H) for r in range(3)] == [(0, 2), (2, 5), (5, 8)]  # uneven: as even as it goes
    assert [head_range(r, 2, 3) for r in range(2)] == [(0, 1), (1, 3)]  # the default model's 3 KV heads
    with pytest.raises(ValueError, match="at least one head"):
        head_range(0, 9, H)
    assert peer_ranks(0, 1, 4, H) == [0, 1, 2, 3]  # prefill tp1 feeds every decode rank
    assert peer_ranks(1, 2, 4, H) == [2, 3]
    assert peer_ranks(3, 4, 2, H) == [1]  # decode rank 3 of 4 hears from prefill rank 1 of 2
    assert slice_mapping(1, 2, 3, 4, H) == ((2, 4), (0, 2))
    assert slice_mapping(0, 2, 3, 4, H) is None
    assert slice_mapping(1, 4, 0, 2, H) == ((0, 2), (2, 4))


def test_every_head_lands_once():
    """For any tp pair, the slices sent to a decode rank tile its heads exactly once."""
    for tp_p in (1, 2, 3, 4, 5, 8):
        for tp_d in (1, 2, 3, 4, 5, 8):
            for d in range(tp_d):
                got = []
                for p in peer_ranks(d, tp_d, tp_p, H):
                    (s0, s1), (d0, d1) = slice_mapping(p, tp_p, d, tp_d, H)
                    assert s1 - s0 == d1 - d0
                    got += list(range(d0, d1))
                lo, hi = head_range(d, tp_d, H)
                assert sorted(got) == list(range(hi - lo))


def test_paired_runs():
    assert paired_runs(np.array([1, 2, 3, 7, 8]), np.array([4, 5, 9, 10, 11])) == [(1, 4, 2), (3, 9, 1), (7, 10, 2)]
    assert paired_runs(np.array([], np.int64), np.array([], np.int64)) == []


def test_tp_slices_reassemble_through_staging():
    """Prefill tp=1 holds all 8 heads; decode tp=4: each decode rank gets its 2 heads via gather -> bytes ->
    scatter, at its own page indices; the union equals the source pages."""
    g = torch.Generator().manual_seed(1)
    src = torch.randn(16, 2, 2, 4, H, 8, generator=g).to(torch.bfloat16)
    src_pages = np.array([3, 4, 5, 11])
    staging = torch.empty(1 << 16, dtype=torch.uint8)
    decode = [torch.zeros(16, 2, 2, 4, H // 4, 8, dtype=torch.bfloat16) for _ in range(4)]
    dst_pages = [np.array([0, 1, 2, 3]), np.array([9, 2, 7, 1]), np.array([15, 14, 13, 12]), np.array([6, 8, 10, 5])]
    for d in range(4):
        (s0, s1), (d0, d1) = slice_mapping(0, 1, d, 4, H)
        out = staging_view(staging, src, len(src_pages), (s0, s1))
        gather_pages(src, src_pages, (s0, s1), out)
        wire_bytes = bytes(out.view(-1).view(torch.uint8).numpy())  # what goes over the socket
        landed = torch.frombuffer(bytearray(wire_bytes), dtype=torch.uint8)
        scatter_pages(decode[d], dst_pages[d], (d0, d1), staging_view(landed, decode[d], len(src_pages), (d0, d1)))
        untouched = np.setdiff1d(np.arange(16), dst_pages[d])
        assert decode[d][untouched].abs().sum() == 0
    for d in range(4):
        assert torch.equal(decode[d][dst_pages[d]], src[src_pages][:, :, :, :, 2 * d : 2 * d + 2])


def test_copy_pages_tp2_to_tp1():
    """Two prefill ranks (2 heads each... of 4) write their halves of decode tp=1 pages directly."""
    g = torch.Generator().manual_seed(2)
    full = torch.randn(8, 1, 2, 2, 4, 4, generator=g)
    prefill = [full[:, :, :, :, 0:2].contiguous(), full[:, :, :, :, 2:4].contiguous()]
    dst = torch.zeros(10, 1, 2, 2, 4, 4)
    src_pages, dst_pages = np.array([1, 2, 6]), np.array([9, 0, 4])
    for p in range(2):
        s, d = slice_mapping(p, 2, 0, 1, 4)
        copy_pages(prefill[p], src_pages, s, dst, dst_pages, d)
    assert torch.equal(dst[dst_pages], full[src_pages])
    assert dst[[1, 2, 3, 5, 6, 7, 8]].abs().sum() == 0


def test_copy_pages_whole_pages_bytes_path():
    g = torch.Generator().manual_seed(4)
    src = torch.randn(12, 2, 2, 4, 2, 8, generator=g).to(torch.bfloat16)
    dst = torch.zeros(20, 2, 2, 4, 2, 8, dtype=torch.bfloat16)
    sp, dp = np.array([0, 1, 2, 7, 3]), np.array([19, 4, 5, 6, 0])
    copy_pages(src, sp, (0, 2), dst, dp, (0, 2))
    assert torch.equal(dst[dp], src[sp])
    rest = np.setdiff1d(np.arange(20), dp)
    assert dst[rest].abs().sum() == 0


def test_host_buffer_rounds_to_huge_pages_and_outlives_its_mapping():
    import gc

    buf = host_buffer(HUGE_PAGE + 1)
    assert buf.dtype == torch.uint8 and buf.numel() == 2 * HUGE_PAGE
    gc.collect()  # the tensor holds the mapping: still writable and readable
    buf.fill_(7)
    assert int(buf[-1]) == 7 and int(buf.sum()) == 7 * 2 * HUGE_PAGE
    assert host_buffer(1).numel() == HUGE_PAGE


def test_staging_pool_reuses_buffers_and_never_waits():
    pool = StagingPool(torch.device("cpu"), 4 * HUGE_PAGE)
    with pool.take(100) as a:
        assert a.numel() == 100
        with pool.take(HUGE_PAGE) as b:  # taken while `a` is out: a second buffer, no wait
            assert b.numel() == HUGE_PAGE and b.data_ptr() != a.data_ptr()
        first = a.data_ptr()
    for _ in range(3):  # one after another: a buffer already made, no new one
        with pool.take(3 * HUGE_PAGE) as c:
            c.fill_(1)
    assert pool.made == 2
    with pool.take(10) as d:
        assert d.data_ptr() in (first, b.data_ptr())
    with pytest.raises(ValueError):
        with pool.take(4 * HUGE_PAGE + 1):
            pass
    made = pool.made
    with pytest.raises(RuntimeError):  # a failed write: its buffer is not handed out again
        with pool.take(10):
            raise RuntimeError("recv timed out")
    with pool.take(10), pool.take(10):
        pass
    assert pool.made == made + 1  # one of the two free buffers was dropped, so one new one
