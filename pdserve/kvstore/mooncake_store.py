"""Mooncake Store as the KV cache data service (`mooncake://master_host:port`): records are
objects in segments the clients contribute (the writer must stay up while they are read); a
fresh object is leased for a few seconds and cannot be removed before. Needs the mooncake
extra (pip install 'pdserve[mooncake]', apt-get install libibverbs1).

Every multi-page call is one Mooncake batch call: `batch_is_exist` for lookups,
`batch_put_from` for saves and `batch_get_into` for loads. The last two move the bytes
between the store and a buffer registered with Mooncake once (one per direction, grown on
demand), with no Python object per page on Mooncake's side. A load takes the record size
the caller expects (`record_nbytes`, one slot per key); a record that does not fit its slot
is fetched alone with `get`, so the caller still sees (and rejects) it.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import parse_qs, urlparse

import numpy as np

from pdserve.kvstore.base import KVStore

SEGMENT_BYTES = 256 << 20  # what this client contributes to the store
BUFFER_BYTES = 64 << 20  # Mooncake's own transfer buffer (setup's local_buffer_size)
BATCH_BYTES = 32 << 20  # each registered buffer: one batch call moves at most this much


class _Registered:
    """A byte buffer registered with the store, reused by one call at a time."""

    def __init__(self, store, nbytes: int) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.buf = np.empty(0, np.uint8)
        self._grow(nbytes)

    def _grow(self, nbytes: int) -> None:
        if self.buf.nbytes:
            self.store.unregister_buffer(self.buf.ctypes.data)
        self.buf = np.empty(nbytes, np.uint8)
        rc = self.store.register_buffer(self.buf.ctypes.data, nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake Store could not register a {nbytes}-byte buffer ({rc})")

    def ensure(self, nbytes: int) -> None:
        if nbytes > self.buf.nbytes:
            self._grow(nbytes)

    def close(self) -> None:
        if self.buf.nbytes:
            self.store.unregister_buffer(self.buf.ctypes.data)
            self.buf = np.empty(0, np.uint8)


def _batches(sizes: list[int], cap: int) -> list[tuple[int, int]]:
    """[lo, hi) runs of consecutive items whose sizes sum to at most cap (at least one each)."""
    out, lo, acc = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and acc + n > cap:
            out.append((lo, i))
            lo, acc = i, 0
        acc += n
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


class MooncakeStore(KVStore):
    def __init__(
        self,
        master: str,
        local_host: str = "127.0.0.1",
        segment_bytes: int = SEGMENT_BYTES,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        os.environ.setdefault("GLOG_minloglevel", "1")
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            raise RuntimeError(f"the mooncake KV store needs pip install 'pdserve[mooncake]' ({e})") from None
        self.store = MooncakeDistributedStore()
        rc = self.store.setup(local_host, "P2PHANDSHAKE", segment_bytes, BUFFER_BYTES, "tcp", "", master)
        if rc != 0:
            raise RuntimeError(f"Mooncake Store setup with master {master} failed ({rc}); is mooncake_master up?")
        self.batch_bytes = batch_bytes
        self._in = _Registered(self.store, batch_bytes)  # loads land here
        self._out = _Registered(self.store, batch_bytes)  # saves leave from here
        self.batch_calls = 0  # Mooncake batch calls made (tests check pages are not moved one by one)

    def exists(self, keys: list[str]) -> int:
        n = 0
        self.batch_calls += 1
        for found in self.store.batch_is_exist(keys):
            if found != 1:
                break
            n += 1
        return n

    def get(self, keys: list[str], record_nbytes: int | None = None) -> list[bytes | None]:
        if record_nbytes is None:  # no slot size known: Mooncake sizes each value itself
            self.batch_calls += 1
            return [bytes(r) or None for r in self.store.get_batch(keys)]
        out: list[bytes | None] = []
        reg = self._in
        with reg.lock:
            reg.ensure(record_nbytes)
            base = reg.buf.ctypes.data
            for lo, hi in _batches([record_nbytes] * len(keys), reg.buf.nbytes):
                offs = [i * record_nbytes for i in range(hi - lo)]
                self.batch_calls += 1
                got = self.store.batch_get_into(keys[lo:hi], [base + o for o in offs], [record_nbytes] * (hi - lo))
                for k, o, n in zip(keys[lo:hi], offs, got):
                    if n >= 0:
                        out.append(reg.buf[o : o + n].tobytes() or None)
                    else:  # missing, or larger than its slot: fetched alone so the caller can reject it
                        out.append(bytes(self.store.get(k)) or None)
        return out

    def put(self, items: list[tuple[str, bytes]]) -> None:
        reg = self._out
        with reg.lock:
            reg.ensure(max((len(r) for _, r in items), default=0))
            for lo, hi in _batches([len(r) for _, r in items], reg.buf.nbytes):
                ptrs, sizes, off = [], [], 0
                for _, rec in items[lo:hi]:
                    reg.buf[off : off + len(rec)] = np.frombuffer(rec, np.uint8)
                    ptrs.append(reg.buf.ctypes.data + off)
                    sizes.append(len(rec))
                    off += len(rec)
                self.batch_calls += 1
                rcs = self.store.batch_put_from([k for k, _ in items[lo:hi]], ptrs, sizes)
                bad = [rc for rc in rcs if rc != 0]
                if bad:
                    raise RuntimeError(f"Mooncake Store batch_put_from failed for {len(bad)} of {len(rcs)} ({bad[0]})")

    def close(self) -> None:
        try:
            self._in.close()
            self._out.close()
        finally:
            self.store.close()


def open_url(url: str) -> KVStore:
    u = urlparse(url)
    q = parse_qs(u.query)
    return MooncakeStore(
        u.netloc,
        q.get("local_host", ["127.0.0.1"])[0],
        int(q.get("segment_bytes", [SEGMENT_BYTES])[0]),
        int(q.get("batch_bytes", [BATCH_BYTES])[0]),
    )
