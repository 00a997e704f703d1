"""Prefix caches by name: `radix` (default) or `none` (`--disable-radix-cache`)."""

from __future__ import annotations

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.prefix_cache import BasePrefixCache, NoCache
from pdserve.engine.radix_cache import RadixCache
from pdserve.enums import PrefixCacheKind

_CACHES: dict[PrefixCacheKind, type[BasePrefixCache]] = {
    PrefixCacheKind.RADIX: RadixCache,
    PrefixCacheKind.NONE: NoCache,
}


def create_prefix_cache(kind: PrefixCacheKind | str, allocator: PageAllocator) -> BasePrefixCache:
    """The prefix cache `kind` over `allocator`'s pages; ValueError for an unknown kind."""
    try:
        kind = PrefixCacheKind(kind)
    except ValueError:
        raise ValueError(f"unknown prefix cache {kind!r}; choose one of {[k.value for k in PrefixCacheKind]}") from None
    return _CACHES[kind](allocator)
