"""The seam between the scheduler and a KV cache data service (`--kv-store`, docs/kvstore.md).

The scheduler sees only this interface, and no tensors: a lookup starts when a request
arrives (`prefetch`, off the scheduler's thread), the request is admitted once it is
`ready` (done, or given up after `--kv-store-timeout`), the pages it found beyond the local
prefix cache are copied into freshly allocated pool pages (`loadable`, `load`), and after
the prompt's prefill the full pages the store does not hold are written (`save`, copied out
of the pool at once, sent from another thread). Implementations: `NoKVConnector` (no store;
the default) and `StoreConnector` (engine/kv_store_connector.py, any backend of
pdserve/kvstore: the embedded service, Mooncake Store, or the in-process `memory://` store,
the fake used in tests). `create_kv_connector` picks one.
"""

from __future__ import annotations

import abc
import threading

from pdserve.messages import KVStoreStats


class KVFetch:
    """One request's store lookup. The fetching thread fills `stored_pages` and `pages`, then
    sets `done`; the scheduler reads them only after `done` (or never: `timed_out`)."""

    __slots__ = ("first_page", "max_pages", "keys", "deadline", "t0", "stored_pages", "pages", "done", "timed_out")

    def __init__(self, first_page: int, max_pages: int, keys: list[str], t0: float, deadline: float) -> None:
        self.first_page = first_page  # pages before it were in the local prefix cache: not fetched
        self.max_pages = max_pages  # pages after it are computed (the prompt's last token samples)
        self.keys = keys  # one per full page of the prompt
        self.t0 = t0
        self.deadline = deadline  # time.monotonic() after which the scheduler computes instead
        self.stored_pages = 0  # the store holds pages [0, stored_pages) (a hash chain: a prefix)
        self.pages: list[memoryview] = []  # checked bytes of pages first_page, first_page + 1, ...
        self.done = threading.Event()
        self.timed_out = False


class BaseKVConnector(abc.ABC):
    """What the scheduler asks of a KV cache data service. Every call returns quickly and
    never raises for a store that is down, slow or corrupt: those are misses."""

    @abc.abstractmethod
    def prefetch(self, tokens: list[int], local_pages: int, max_pages: int) -> KVFetch | None:
        """Start looking up the full pages of `tokens`; pages below `local_pages` are in the
        local prefix cache and pages from `max_pages` on are computed anyway: neither is
        fetched. None: no lookup."""

    @abc.abstractmethod
    def ready(self, fetch: KVFetch) -> bool:
        """The lookup finished, or has run past its deadline (then it counts as a miss)."""

    @abc.abstractmethod
    def wait(self, fetch: KVFetch, timeout_s: float) -> None:
        """Sleep until the lookup finishes or `timeout_s` passes (an idle scheduler's wait)."""

    @abc.abstractmethod
    def loadable(self, fetch: KVFetch, first_page: int) -> int:
        """How many pages from `first_page` on (the local prefix cache's hit at admission)
        were fetched and checked and may be loaded."""

    def stored_pages(self, fetch: KVFetch) -> int:
        """Full pages the store held at the lookup (0 if it did not finish in time)."""
        return fetch.stored_pages if fetch.done.is_set() and not fetch.timed_out else 0

    @abc.abstractmethod
    def load(self, fetch: KVFetch, first_page: int, pool_pages: list[int]) -> None:
        """Copy fetched pages first_page, first_page + 1, ... into these pool pages."""

    @abc.abstractmethod
    def save(self, tokens: list[int], pool_pages: list[int], stored_pages: int) -> None:
        """The prompt `tokens` was prefilled into `pool_pages`: write its full pages from
        `stored_pages` on (the store holds those before) unless they were written already.
        Copies the bytes now; the write happens later, or is dropped if the store lags."""

    @abc.abstractmethod
    def stats(self) -> KVStoreStats | None:
        """Counters for /get_load and /metrics; None without a store."""

    def disable(self, reason: str) -> None:
        """Stop using the store (the weights changed: stored pages no longer match)."""

    def close(self) -> None:
        pass


class NoKVConnector(BaseKVConnector):
    """No `--kv-store`: never looks anything up, never writes."""

    def prefetch(self, tokens: list[int], local_pages: int, max_pages: int) -> None:
        return None

    def ready(self, fetch: KVFetch) -> bool:
        return True

    def wait(self, fetch: KVFetch, timeout_s: float) -> None:
        pass

    def loadable(self, fetch: KVFetch, first_page: int) -> int:
        return 0

    def load(self, fetch: KVFetch, first_page: int, pool_pages: list[int]) -> None:
        if pool_pages:
            raise RuntimeError("NoKVConnector has nothing to load")

    def save(self, tokens: list[int], pool_pages: list[int], stored_pages: int) -> None:
        pass

    def stats(self) -> None:
        return None
