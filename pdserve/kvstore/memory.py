"""An in-process LRU of records with a byte capacity: the fake store in tests and the
storage of the embedded service."""

from __future__ import annotations

import threading
from collections import OrderedDict
from urllib.parse import urlparse

from pdserve.kvstore.base import KVStore

DEFAULT_CAPACITY = 1 << 30


class MemoryStore(KVStore):
    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity must be >= 1 byte, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.used = 0
        self.evicted = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def exists(self, keys: list[str]) -> int:
        with self._lock:
            n = 0
            for k in keys:
                if k not in self._items:
                    break
                self._items.move_to_end(k)
                n += 1
            return n

    def get(self, keys: list[str], record_nbytes: int | None = None) -> list[bytes | None]:
        with self._lock:
            out = []
            for k in keys:
                rec = self._items.get(k)
                if rec is not None:
                    self._items.move_to_end(k)
                out.append(rec)
            return out

    def put(self, items: list[tuple[str, bytes]]) -> None:
        with self._lock:
            for k, rec in items:
                if k in self._items or len(rec) > self.capacity:
                    continue
                while self.used + len(rec) > self.capacity:  # least recently used first
                    _, old = self._items.popitem(last=False)
                    self.used -= len(old)
                    self.evicted += 1
                self._items[k] = rec
                self.used += len(rec)

    def __len__(self) -> int:
        return len(self._items)


def open_url(url: str) -> KVStore:
    cap = urlparse(url).netloc
    return MemoryStore(int(cap) if cap else DEFAULT_CAPACITY)
