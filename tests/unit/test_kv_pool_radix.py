"""KV page allocator and radix cache invariants (property-based)."""

import pytest
from hypothesis import given, settings, strategies as st

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.prefix_cache import NoCache
from pdserve.engine.radix_cache import RadixCache


def test_alloc_free_roundtrip():
    a = PageAllocator(8, 4)
    p = a.alloc(5)
    assert len(set(p)) == 5 and a.num_free == 3
    assert a.alloc(4) is None and a.num_free == 3  # all-or-nothing
    a.free(p)
    assert a.num_free == 8
    with pytest.raises(RuntimeError, match="double free"):
        a.free(p[:1])


def test_bad_sizes():
    with pytest.raises(ValueError):
        PageAllocator(0, 4)
    with pytest.raises(ValueError):
        PageAllocator(4, 0)


def test_match_insert_split():
    a = PageAllocator(32, 2)
    c = RadixCache(a)
    pages = a.alloc(3)
    assert c.insert([1, 2, 3, 4, 5, 6, 7], pages) == 0  # 7 tokens -> 3 full pages
    got, node = c.match_prefix([1, 2, 3, 4, 9, 9])
    assert got == pages[:2]  # split at the page boundary
    got, _ = c.match_prefix([1, 2, 3, 9])
    assert got == pages[:1]
    got, _ = c.match_prefix([1, 3])
    assert got == []
    # inserting a longer sequence reports the shared prefix
    more = a.alloc(4)
    assert c.insert([1, 2, 3, 4, 5, 6, 7, 8], more) == 6
    assert c.total_pages() == 4


def test_lock_blocks_eviction():
    a = PageAllocator(8, 1)
    c = RadixCache(a)
    c.insert([1, 2, 3], a.alloc(3))
    _, node = c.match_prefix([1, 2, 3])
    c.inc_lock(node)
    assert c.evict(10) == 0 and c.protected_pages == 3
    c.dec_lock(node)
    assert c.evict(10) == 3 and a.num_free == 8


def test_nocache_never_matches():
    a = PageAllocator(8, 1)
    c = NoCache(a)
    assert c.insert([1, 2], [0, 1]) == 2  # caller frees everything
    assert c.match_prefix([1, 2])[0] == []


seqs = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=12), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(seqs, st.integers(1, 3), st.lists(st.integers(0, 11), max_size=6))
def test_random_inserts_conserve_pages(sequences, ps, evictions):
    """Every page is either free or owned by exactly one cache node, whatever the
    sequence of inserts, matches, locks and evictions."""
    a = PageAllocator(200, ps)
    c = RadixCache(a)
    locked = []
    for i, toks in enumerate(sequences):
        pages, node = c.match_prefix(toks)
        n_full = len(toks) // ps
        assert len(pages) <= n_full
        own = a.alloc(n_full - len(pages))
        dup = c.insert(toks, pages + own)
        # caller frees its duplicates (pages it allocated for an already-cached span)
        a.free(own[: max(0, dup // ps - len(pages))])
        if i % 3 == 0:
            _, n = c.match_prefix(toks)
            c.inc_lock(n)
            locked.append(n)
        owned = c.total_pages()
        assert owned + a.num_free == 200
        assert c.evictable_pages + c.protected_pages == owned
        # every cached prefix is found again
        got, _ = c.match_prefix(toks)
        assert len(got) == n_full
    for k in evictions:
        c.evict(k)
        assert c.total_pages() + a.num_free == 200
    for n in locked:
        c.dec_lock(n)
    c.reset()
    assert a.num_free == 200 and c.total_pages() == 0


def test_prefix_caches_by_name():
    from pdserve.engine.prefix_cache import BasePrefixCache
    from pdserve.engine.prefix_caches import create_prefix_cache

    a = PageAllocator(8, 1)
    assert isinstance(create_prefix_cache("radix", a), RadixCache)
    assert isinstance(create_prefix_cache("none", a), NoCache)
    assert all(isinstance(create_prefix_cache(k, a), BasePrefixCache) for k in ("radix", "none"))
    with pytest.raises(ValueError, match="unknown prefix cache"):
        create_prefix_cache("lru", a)
