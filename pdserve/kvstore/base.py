"""The store interface and the wrapper servers use (stores.py opens one by URL).

A store holds encoded page records (record.py) by key (keys.py). Backends:
- `memory`: an in-process LRU with a byte capacity (the fake in tests, and the storage of
  the embedded service);
- `embedded` (`http://host:port`): a `pdserve kvstore` service, the default;
- `mooncake` (`mooncake://master_host:port`): Mooncake Store (`mooncake_master` started by
  the user or by `pdserve kvstore --backend mooncake`).

Servers never call a backend directly: `SafeStore` turns every error or timeout into a miss
(logged, counted), so a store that is down or slow never fails a request.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class KVStore(ABC):
    @abstractmethod
    def exists(self, keys: list[str]) -> int:
        """How many of `keys`, from the first, the store holds (the longest stored prefix)."""

    @abstractmethod
    def get(self, keys: list[str], record_nbytes: int | None = None) -> list[bytes | None]:
        """The records of `keys` (None where missing). `record_nbytes`: the size the caller
        expects each record to have (a hint: a backend that fetches into fixed slots sizes
        them so; a record of another size must still be returned, for the caller to reject)."""

    @abstractmethod
    def put(self, items: list[tuple[str, bytes]]) -> None:
        """Store these records (existing keys are left as they are)."""

    def close(self) -> None:
        pass


@dataclass
class StoreStats:
    lookups: int = 0
    hit_pages: int = 0
    bytes_in: int = 0  # fetched from the store
    bytes_out: int = 0  # written to the store
    errors: int = 0
    seconds: float = 0.0  # time spent in store calls


class SafeStore:
    """What a server holds: every call bounded and error-free (a failure is a miss)."""

    def __init__(self, store: KVStore, name: str) -> None:
        self.store = store
        self.name = name
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._last_warning = 0.0

    def _call(self, what: str, fn, default):
        t0 = time.monotonic()
        try:
            return fn()
        except Exception as e:  # a store that is down or slow must not fail the request
            with self._lock:
                self.stats.errors += 1
            now = time.monotonic()
            if now - self._last_warning > 10:  # one line per 10 s, not one per request
                self._last_warning = now
                logger.warning("KV store %s: %s failed (%s); computing without it", self.name, what, e)
            return default
        finally:
            with self._lock:
                self.stats.seconds += time.monotonic() - t0

    def exists(self, keys: list[str]) -> int:
        if not keys:
            return 0
        n = self._call("exists", lambda: self.store.exists(keys), 0)
        with self._lock:
            self.stats.lookups += 1
        return max(0, min(int(n), len(keys)))

    def get(self, keys: list[str], record_nbytes: int | None = None) -> list[bytes | None]:
        if not keys:
            return []
        recs = self._call("get", lambda: self.store.get(keys, record_nbytes), [None] * len(keys))
        if len(recs) != len(keys):
            recs = [None] * len(keys)
        with self._lock:
            self.stats.bytes_in += sum(len(r) for r in recs if r)
        return recs

    def put(self, items: list[tuple[str, bytes]]) -> bool:
        """True if the store took them (False: an error, counted and logged)."""
        if not items:
            return True

        def put() -> bool:
            self.store.put(items)
            return True

        ok = self._call("put", put, False)
        if ok:
            with self._lock:
                self.stats.bytes_out += sum(len(r) for _, r in items)
        return ok

    def count_hits(self, pages: int) -> None:
        with self._lock:
            self.stats.hit_pages += pages

    def close(self) -> None:
        self._call("close", self.store.close, None)
