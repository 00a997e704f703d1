"""Mooncake Store as the KV cache data service (`mooncake://master_host:port`): records are
objects in segments the clients contribute (the writer must stay up while they are read); a
fresh object is leased for a few seconds and cannot be removed before. Needs the mooncake
extra (pip install 'pdserve[mooncake]', apt-get install libibverbs1)."""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlparse

from pdserve.kvstore.base import KVStore

SEGMENT_BYTES = 256 << 20  # what this client contributes to the store
BUFFER_BYTES = 64 << 20


class MooncakeStore(KVStore):
    def __init__(self, master: str, local_host: str = "127.0.0.1", segment_bytes: int = SEGMENT_BYTES) -> None:
        os.environ.setdefault("GLOG_minloglevel", "1")
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            raise RuntimeError(f"the mooncake KV store needs pip install 'pdserve[mooncake]' ({e})") from None
        self.store = MooncakeDistributedStore()
        rc = self.store.setup(local_host, "P2PHANDSHAKE", segment_bytes, BUFFER_BYTES, "tcp", "", master)
        if rc != 0:
            raise RuntimeError(f"Mooncake Store setup with master {master} failed ({rc}); is mooncake_master up?")

    def exists(self, keys: list[str]) -> int:
        n = 0
        for found in self.store.batch_is_exist(keys):
            if found != 1:
                break
            n += 1
        return n

    def get(self, keys: list[str]) -> list[bytes | None]:
        return [bytes(r) or None for r in (self.store.get(k) for k in keys)]

    def put(self, items: list[tuple[str, bytes]]) -> None:
        for k, rec in items:
            rc = self.store.put(k, rec)
            if rc != 0:
                raise RuntimeError(f"Mooncake Store put failed ({rc})")

    def close(self) -> None:
        self.store.close()


def open_url(url: str) -> KVStore:
    u = urlparse(url)
    q = parse_qs(u.query)
    return MooncakeStore(
        u.netloc, q.get("local_host", ["127.0.0.1"])[0], int(q.get("segment_bytes", [SEGMENT_BYTES])[0])
    )
