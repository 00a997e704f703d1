"""The prefix cache interface the scheduler uses, and the cache that keeps nothing.

Implementations: `RadixCache` (engine/radix_cache.py, the default) and `NoCache`
(`--disable-radix-cache`); engine/prefix_caches.py picks one by name.
"""

from __future__ import annotations

import abc
from typing import Any

from pdserve.engine.kv_pool import PageAllocator


class BasePrefixCache(abc.ABC):
    """KV pages of token prefixes, shared between requests.

    A match returns pages and an opaque handle; the request locks the handle while it
    holds those pages (`inc_lock` / `dec_lock`), and unlocked entries may be evicted.
    """

    def __init__(self, allocator: PageAllocator) -> None:
        self.alloc = allocator
        self.page_size = allocator.page_size
        self.evictable_pages = 0  # pages only the cache holds (freed by evict)
        self.hit_tokens = 0  # tokens matched, over all match_prefix calls
        self.query_tokens = 0  # tokens asked for, over all match_prefix calls

    @abc.abstractmethod
    def match_prefix(self, tokens: list[int]) -> tuple[list[int], Any]:
        """Longest cached page-aligned prefix of `tokens`: (its pages, a handle to lock)."""

    def cached_len(self, tokens: list[int]) -> int:
        """Tokens of `tokens` match_prefix would match now, without counting a lookup or
        touching the entries (a KV store lookup asks only beyond them)."""
        return 0

    @abc.abstractmethod
    def insert(self, tokens: list[int], pages: list[int]) -> int:
        """Cache the page-aligned prefix of `tokens` held in `pages`; returns how many
        leading tokens were cached already (the caller frees its own pages of that span)."""

    @abc.abstractmethod
    def inc_lock(self, handle: Any) -> None:
        """A request holds the pages of `handle` (from match_prefix): not evictable."""

    @abc.abstractmethod
    def dec_lock(self, handle: Any) -> None:
        """The request let go of `handle`."""

    @abc.abstractmethod
    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` unlocked pages to the allocator; returns how many."""

    def reset(self) -> None:
        """Drop every unlocked entry (flush_cache)."""
        self.evict(self.evictable_pages)


class NoCache(BasePrefixCache):
    """`--disable-radix-cache`: never matches, never keeps anything."""

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], None]:
        self.query_tokens += len(tokens)
        return [], None

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        # "all of it was cached already": the caller frees every page it owns
        return len(tokens) // self.page_size * self.page_size

    def inc_lock(self, handle: None) -> None:
        pass

    def dec_lock(self, handle: None) -> None:
        pass

    def evict(self, num_pages: int) -> int:
        return 0
