"""Prefix-aware routing (SGLang's `cache_aware`), over per-worker approximate trees.

1. If the load is imbalanced (max - min > `balance_abs_threshold` and
   max > min * `balance_rel_threshold`), the least loaded worker wins.
2. Else the worker whose tree matches the longest prefix of the request wins when
   matched / len(text) > `cache_threshold`.
3. Else the least loaded worker (ties: the one holding the fewest characters, i.e.
   the most free cache, then pool order).
The chosen worker's tree then records the text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from pdserve.router.policies.base import LoadBalancingPolicy, register_policy
from pdserve.router.policies.prefix_tree import PrefixTree

if TYPE_CHECKING:
    from pdserve.router.workers import Worker


@register_policy
class CacheAwarePolicy(LoadBalancingPolicy):
    name = "cache_aware"
    needs_load = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trees: dict[str, PrefixTree] = {}

    def tree(self, url: str) -> PrefixTree:
        t = self.trees.get(url)
        if t is None:
            t = self.trees[url] = PrefixTree(self.config.max_tree_size)
        return t

    def select(self, workers: Sequence["Worker"], text: str | None) -> "Worker":
        cfg = self.config
        loads = [w.load for w in workers]
        lo, hi = min(loads), max(loads)
        imbalanced = hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold
        chosen: Worker | None = None
        if not imbalanced and text:
            matches = [self.tree(w.url).match_len(text) for w in workers]
            best = max(range(len(workers)), key=lambda i: matches[i])
            if matches[best] / len(text) > cfg.cache_threshold:
                chosen = workers[best]
        if chosen is None:
            chosen = min(workers, key=lambda w: (w.load, self.tree(w.url).size))
        if text:
            self.tree(chosen.url).insert(text)
        return chosen

    def on_worker_removed(self, url: str) -> None:
        self.trees.pop(url, None)
