"""Radix (prefix) cache over KV pages, with reference counts and LRU eviction.

Keys are token ids at page granularity: a node's key length is a multiple of
page_size and it owns one page per page_size tokens. Nodes locked by running
requests (lock_ref > 0, propagated to the root) are never evicted.
The interface is engine/prefix_cache.py's `BasePrefixCache`.
"""

from __future__ import annotations

import heapq
import itertools
import time

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.prefix_cache import BasePrefixCache


class Node:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...] = (), pages: list[int] | None = None, parent: "Node | None" = None) -> None:
        self.key = key
        self.pages = pages or []
        self.children: dict[tuple[int, ...], Node] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = time.monotonic()


class RadixCache(BasePrefixCache):
    def __init__(self, allocator: PageAllocator) -> None:
        super().__init__(allocator)
        self.root = Node()
        self.root.lock_ref = 1  # never evicted
        self.protected_pages = 0  # pages in locked nodes (evictable_pages: in unlocked ones)
        self._tick = itertools.count()

    # ---- lookups --------------------------------------------------------------------------
    def _first(self, key: tuple[int, ...]) -> tuple[int, ...]:
        return key[: self.page_size]

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], Node]:
        """Longest cached page-aligned prefix of `tokens`: (its pages, deepest node)."""
        n = len(tokens) // self.page_size * self.page_size
        key = tuple(tokens[:n])
        node, pages, i = self.root, [], 0
        now = time.monotonic()
        while i < n:
            child = node.children.get(key[i : i + self.page_size])
            if child is None:
                break
            m = self._match_len(child.key, key[i:])
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            pages.extend(child.pages)
            i += len(child.key)
            node = child
        self.query_tokens += len(tokens)
        self.hit_tokens += i
        return pages, node

    def cached_len(self, tokens: list[int]) -> int:
        n = len(tokens) // self.page_size * self.page_size
        key = tuple(tokens[:n])
        node, i = self.root, 0
        while i < n:
            child = node.children.get(key[i : i + self.page_size])
            if child is None:
                break
            m = self._match_len(child.key, key[i:])
            i += m
            if m < len(child.key):
                break
            node = child
        return i

    def _match_len(self, a: tuple[int, ...], b: tuple[int, ...]) -> int:
        """Common prefix length of a and b, rounded down to pages."""
        m = 0
        limit = min(len(a), len(b))
        while m < limit and a[m] == b[m]:
            m += 1
        return m // self.page_size * self.page_size

    def _split(self, child: Node, m: int) -> Node:
        """Split `child` at token m (page-aligned); returns the new upper node."""
        upper = Node(child.key[:m], child.pages[: m // self.page_size], child.parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        child.parent.children[self._first(upper.key)] = upper
        child.key = child.key[m:]
        child.pages = child.pages[m // self.page_size :]
        child.parent = upper
        upper.children[self._first(child.key)] = child
        return upper

    # ---- insertion ------------------------------------------------------------------------
    def insert(self, tokens: list[int], pages: list[int]) -> int:
        """Insert a page-aligned key with its pages; returns how many leading tokens
        were already cached (the caller frees its own pages for that span, except
        those it borrowed from the cache)."""
        n = len(tokens) // self.page_size * self.page_size
        assert len(pages) >= n // self.page_size
        key = tuple(tokens[:n])
        node, i = self.root, 0
        now = time.monotonic()
        while i < n:
            child = node.children.get(key[i : i + self.page_size])
            if child is None:
                new = Node(key[i:], list(pages[i // self.page_size : n // self.page_size]), node)
                new.last_access = now
                node.children[self._first(new.key)] = new
                self.evictable_pages += len(new.pages)
                return i
            m = self._match_len(child.key, key[i:])
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            i += len(child.key)
            node = child
        return i

    # ---- locking --------------------------------------------------------------------------
    def inc_lock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
                self.protected_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self.evictable_pages += len(node.pages)
                self.protected_pages -= len(node.pages)
            node.lock_ref -= 1
            assert node.lock_ref >= 0
            node = node.parent

    # ---- eviction -------------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Free up to num_pages pages from unlocked leaves, least recently used first."""
        heap = [(n.last_access, next(self._tick), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            self.alloc.free(node.pages)
            freed += len(node.pages)
            self.evictable_pages -= len(node.pages)
            parent = node.parent
            del parent.children[self._first(node.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(self._tick), parent))
        return freed

    def _leaves(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            if not n.children and n is not self.root:
                yield n
            stack.extend(n.children.values())

    def total_pages(self) -> int:
        total, stack = 0, [self.root]
        while stack:
            n = stack.pop()
            total += len(n.pages)
            stack.extend(n.children.values())
        return total
