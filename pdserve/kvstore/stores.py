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
# backend names other engines take (SGLang's --hicache-storage-backend): they need a URL here
_NAMES = ("mooncake", "file", "hf3fs", "nixl", "embedded", "memory", "http")


def url_error(url: str) -> str | None:
    """Why `url` cannot name a store, or None: the scheme, host and port are checked, and that
    the backend's package loads (nothing is contacted)."""
    if not isinstance(url, str) or not url:
        return "give the store's URL, e.g. http://127.0.0.1:9015 (`pdserve kvstore`)"
    if "://" not in url:
        if url in _NAMES:
            return (
                f"{url!r} is a backend name; give the store's URL: http://HOST:PORT (`pdserve kvstore`, "
                "the embedded service), mooncake://MASTER_HOST:PORT (Mooncake Store) or memory:// (in-process)"
            )
        return f"{url!r} is not a URL; use http://HOST:PORT, mooncake://MASTER_HOST:PORT or memory://"
    u = urlparse(url)
    if u.scheme not in _OPENERS:
        return f"unknown scheme {u.scheme!r} in {url!r}; use one of {', '.join(s + '://' for s in sorted(_OPENERS))}"
    if u.scheme == "memory":
        if u.netloc and not (u.netloc.isdigit() and int(u.netloc) > 0):
            return f"memory://[CAPACITY_BYTES]: {u.netloc!r} is not a positive byte count"
        return None
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or port is None or not (0 < port < 65536):
        return f"{url!r} needs a host and a port in 1..65535, e.g. {u.scheme}://127.0.0.1:9015"
    if u.scheme == "mooncake":
        try:
            import mooncake.store  # noqa: F401
        except ImportError:
            return "the mooncake store needs the mooncake package: pip install 'pdserve[mooncake]'"
    return None


def open_store(url: str) -> KVStore:
    """`memory://[capacity_bytes]`, `http://host:port` (embedded service), `mooncake://host:port`."""
    err = url_error(url)
    if err is not None:
        raise ValueError(f"--kv-store {url!r}: {err}")
    return _OPENERS[urlparse(url).scheme](url)
