"""The store backends by URL scheme (base.py: KVStore)."""

from __future__ import annotations

from typing import Callable
from urllib.parse import urlparse

from pdserve.kvstore import http_client, memory, mooncake_store
from pdserve.kvstore.base import KVStore

_OPENERS: dict[str, Callable[[str], KVStore]] = {
    "http": http_client.HttpStore,
    "memory": memory.open_url,
    "mooncake": mooncake_store.open_url,
}


def open_store(url: str) -> KVStore:
    """`memory://[capacity_bytes]`, `http://host:port` (embedded service), `mooncake://host:port`."""
    scheme = urlparse(url).scheme
    if scheme not in _OPENERS:
        raise ValueError(
            f"--kv-store {url!r}: unknown scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in sorted(_OPENERS))}"
        )
    return _OPENERS[scheme](url)
