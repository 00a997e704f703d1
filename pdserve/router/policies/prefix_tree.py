"""An approximate prefix cache of one worker: a character radix tree with LRU eviction.

The router cannot see a worker's real KV cache; it remembers which texts it sent
where, which approximates it well enough to send shared prefixes to the same worker
(SGLang's cache-aware policy does the same). Memory is bounded by `max_size`
characters: when an insert goes over it, least-recently used leaves go first.
"""

from __future__ import annotations

import heapq
import itertools


class _Node:
    __slots__ = ("label", "children", "parent", "last_access")

    def __init__(self, label: str, parent: "_Node | None", tick: int) -> None:
        self.label = label  # edge label from the parent; "" only at the root
        self.children: dict[str, _Node] = {}  # first char of the child's label -> child
        self.parent = parent
        self.last_access = tick


def common_prefix_len(label: str, text: str, start: int) -> int:
    """Length of the common prefix of `label` and `text[start:]`, in C-speed steps."""
    m = min(len(label), len(text) - start)
    if text.startswith(label[:m], start):
        return m
    lo, hi = 0, m - 1  # invariant: the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(label[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """`insert(text)`, `match_len(text)`, `size` (characters held), LRU `evict`."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._ticks = itertools.count(1)
        self.root = _Node("", None, 0)
        self.size = 0

    def match_len(self, text: str) -> int:
        """Characters of `text`'s longest prefix held in the tree (refreshes their LRU time)."""
        tick = next(self._ticks)
        node, i = self.root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            n = common_prefix_len(child.label, text, i)
            child.last_access = tick
            i += n
            if n < len(child.label):
                break
            node = child
        return i

    def insert(self, text: str) -> None:
        tick = next(self._ticks)
        node, i = self.root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                node.children[text[i]] = _Node(text[i:], node, tick)
                self.size += len(text) - i
                break
            n = common_prefix_len(child.label, text, i)
            if n < len(child.label):  # split the edge at n
                mid = _Node(child.label[:n], node, tick)
                node.children[text[i]] = mid
                child.label = child.label[n:]
                child.parent = mid
                mid.children[child.label[0]] = child
                child = mid
            child.last_access = tick
            i += n
            node = child
        if self.size > self.max_size:
            self.evict(int(self.max_size * 0.9))

    def evict(self, target_size: int) -> None:
        """Drops least-recently used leaves until `size <= target_size`."""
        heap = [(n.last_access, id(n), n) for n in self._nodes() if not n.children and n is not self.root]
        heapq.heapify(heap)
        while self.size > target_size and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            if parent is None or leaf.children:
                continue
            del parent.children[leaf.label[0]]
            leaf.parent = None
            self.size -= len(leaf.label)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def _nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
