"""`StoreConnector`: the scheduler's KV connector (engine/kv_connector.py) over a store of
pdserve/kvstore (`--kv-store URL`).

Threads: lookups run on two fetch threads (exists, then get of the pages beyond the local
prefix cache, each record checked: key, size, CRC-32), writes on one writer thread. The
scheduler's thread only hashes keys, copies page bytes into or out of the pool (numpy
copies of whole pages) and reads finished lookups. A call that fails or a lookup that runs
past `timeout_s` is a miss, and the store is left alone for `BACKOFF_S` (lookups and
writes are skipped), so a dead or hung store costs each request at most one timeout and
then nothing.

Tensor parallelism: each tp rank's pool holds its own KV heads ([num_pages, layers, 2,
page_size, local_heads, head_dim], rank 0 maps every rank's pool: shared memory it
allocated). A record is still the whole page with every head, the same bytes as a tp-1
server's: a save concatenates the ranks' heads, a load splits them. So the keys do not
depend on the tp size, and servers of any tp size share what they stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pdserve.engine.kv_connector import BaseKVConnector, KVFetch
from pdserve.kvstore import record
from pdserve.kvstore.base import KVStore, SafeStore
from pdserve.kvstore.keys import StoreLayout, page_keys
from pdserve.messages import KVStoreStats

logger = logging.getLogger(__name__)

BACKOFF_S = 10.0  # after an error or a timeout, the store is not asked for this long
MAX_PENDING_WRITE_BYTES = 256 << 20  # copied pages waiting for the writer; beyond: dropped
REMEMBERED_KEYS = 1 << 16  # keys known to be in the store (seen, loaded, written): not written again


class StoreConnector(BaseKVConnector):
    def __init__(
        self,
        store: KVStore,
        name: str,
        layout: StoreLayout,
        pool: torch.Tensor | list[torch.Tensor],
        timeout_s: float,
    ) -> None:
        """`pool`: the KV pool [num_pages, layers, 2, page_size, heads, head_dim], or every tp
        rank's pool in rank order (each with its own heads); one page of all of them is one
        record's bytes."""
        pools = [pool] if isinstance(pool, torch.Tensor) else list(pool)
        for p in pools:
            if not p.is_contiguous() or p.device.type != "cpu":
                raise ValueError("the KV store needs contiguous CPU KV pools")
        if len({(p.shape[0], *p.shape[1:4], p.shape[5], p.dtype) for p in pools}) != 1:
            raise ValueError("the tp ranks' KV pools differ in more than their heads")
        self.store = SafeStore(store, name)
        self.name = name
        self.layout = layout
        self.timeout_s = timeout_s
        self.page_nbytes = sum(p[0].numel() * p.element_size() for p in pools)
        if self.page_nbytes != layout.page_nbytes:
            raise ValueError(f"KV pool pages hold {self.page_nbytes} bytes, the store layout {layout.page_nbytes}")
        self._pools = pools
        # one pool: its bytes, one row per page (a view: writes land in the pool)
        self._rows = pools[0].view(torch.uint8).view(pools[0].shape[0], -1).numpy() if len(pools) == 1 else None
        self._fetcher = ThreadPoolExecutor(2, thread_name_prefix="pdserve-kvstore-fetch")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="pdserve-kvstore-write")
        self._lock = threading.Lock()
        self._s = KVStoreStats()
        self._known: OrderedDict[str, None] = OrderedDict()
        self._down_until = 0.0
        self._disabled: str | None = None
        self._last_log = 0.0
        logger.info("KV store %s: page %d tokens, %d bytes per record", name, layout.page_size, self.page_nbytes)

    # ---- health -----------------------------------------------------------------------------
    def _available(self) -> bool:
        return self._disabled is None and time.monotonic() >= self._down_until

    def _back_off(self, why: str) -> None:
        now = time.monotonic()
        self._down_until = now + BACKOFF_S
        if now - self._last_log > BACKOFF_S:
            self._last_log = now
            logger.warning(
                "KV store %s: %s; prefixes are computed, the store is retried in %.0f s", self.name, why, BACKOFF_S
            )

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log > BACKOFF_S:
            self._last_log = now
            logger.warning("KV store %s: %s", self.name, message)

    # ---- lookups ----------------------------------------------------------------------------
    def prefetch(self, tokens: list[int], local_pages: int, max_pages: int) -> KVFetch | None:
        if max_pages <= local_pages or not self._available():
            return None
        now = time.monotonic()
        # every full page is looked up (what is stored is not written again); at most
        # max_pages are fetched
        fetch = KVFetch(local_pages, max_pages, page_keys(self.layout, tokens), now, now + self.timeout_s)
        with self._lock:
            self._s.kv_store_query_tokens += (max_pages - local_pages) * self.layout.page_size
        self._fetcher.submit(self._fetch, fetch)
        return fetch

    def _fetch(self, f: KVFetch) -> None:
        errors = self.store.stats.errors
        rejected = 0
        try:
            n = f.stored_pages = self.store.exists(f.keys)
            self._remember(f.keys[:n])
            if min(n, f.max_pages) > f.first_page and not f.timed_out:
                keys = f.keys[f.first_page : min(n, f.max_pages)]
                for key, rec in zip(keys, self.store.get(keys, record.HEADER_SIZE + self.page_nbytes)):
                    if rec is None:
                        break
                    try:
                        f.pages.append(record.decode(key, rec, self.page_nbytes))
                    except record.RecordError as e:  # never loaded; the pages after it neither
                        rejected += 1
                        self._warn(f"record {key[:12]}... rejected: {e}")
                        break
        except Exception as e:  # pragma: no cover - SafeStore already turns errors into misses
            logger.exception("KV store lookup failed: %s", e)
        finally:
            if self.store.stats.errors > errors:
                self._back_off("a lookup failed")
            with self._lock:
                self._s.kv_store_fetches += 1
                self._s.kv_store_fetch_seconds += time.monotonic() - f.t0
                self._s.kv_store_rejected_pages += rejected
            f.done.set()

    def ready(self, fetch: KVFetch) -> bool:
        if fetch.done.is_set() or fetch.timed_out:
            return True
        if time.monotonic() < fetch.deadline:
            return False
        fetch.timed_out = True
        with self._lock:
            self._s.kv_store_timeouts += 1
        self._back_off(f"a lookup took over {self.timeout_s:g} s (--kv-store-timeout)")
        return True

    def wait(self, fetch: KVFetch, timeout_s: float) -> None:
        fetch.done.wait(min(timeout_s, max(0.0, fetch.deadline - time.monotonic())))

    def loadable(self, fetch: KVFetch, first_page: int) -> int:
        if fetch.timed_out or not fetch.done.is_set() or first_page < fetch.first_page:
            return 0  # given up on, or the local prefix shrank since (a gap before the fetched pages)
        return max(0, fetch.first_page + len(fetch.pages) - first_page)

    def load(self, fetch: KVFetch, first_page: int, pool_pages: list[int]) -> None:
        i0 = first_page - fetch.first_page
        assert 0 <= i0 and i0 + len(pool_pages) <= len(fetch.pages)
        if self._rows is not None:
            for i, page in enumerate(pool_pages):
                self._rows[page] = np.frombuffer(fetch.pages[i0 + i], dtype=np.uint8)
        elif pool_pages:  # tp: whole pages, then each rank's heads into its pool
            p0 = self._pools[0]
            full = torch.empty((len(pool_pages), *p0.shape[1:4], self.layout.kv_heads, p0.shape[5]), dtype=p0.dtype)
            rows = full.view(torch.uint8).view(len(pool_pages), -1).numpy()
            for i in range(len(pool_pages)):
                rows[i] = np.frombuffer(fetch.pages[i0 + i], dtype=np.uint8)
            idx = torch.tensor(pool_pages, dtype=torch.int64)
            h0 = 0
            for p in self._pools:
                h1 = h0 + p.shape[4]
                p.index_copy_(0, idx, full[:, :, :, :, h0:h1, :])
                h0 = h1
        with self._lock:
            self._s.kv_store_hit_tokens += len(pool_pages) * self.layout.page_size

    # ---- writes -----------------------------------------------------------------------------
    def save(self, tokens: list[int], pool_pages: list[int], stored_pages: int) -> None:
        n = min(len(tokens) // self.layout.page_size, len(pool_pages))
        if n <= stored_pages or self._disabled is not None:
            return
        keys = page_keys(self.layout, tokens, n)
        with self._lock:
            todo = [i for i in range(stored_pages, n) if keys[i] not in self._known]
            if not todo:
                return
            nbytes = len(todo) * self.page_nbytes
            if not self._available() or self._s.kv_store_pending_write_bytes + nbytes > MAX_PENDING_WRITE_BYTES:
                self._s.kv_store_dropped_writes += len(todo)
                return
            self._s.kv_store_pending_write_bytes += nbytes
        self._remember([keys[i] for i in todo])
        # one copy of the pages now: the pool pages may be reused once the request ends
        rows = self._copy_out([pool_pages[i] for i in todo])
        self._writer.submit(self._write, [keys[i] for i in todo], rows)

    def _copy_out(self, pages: list[int]) -> np.ndarray:
        """[len(pages), page_nbytes] bytes of these pool pages: every head, in the record's order."""
        if self._rows is not None:
            return self._rows[np.asarray(pages)]
        idx = torch.tensor(pages, dtype=torch.int64)
        full = torch.cat([p.index_select(0, idx) for p in self._pools], dim=4)  # heads in rank order
        return full.view(torch.uint8).view(len(pages), -1).numpy()

    def _remember(self, keys: list[str]) -> None:
        with self._lock:
            for k in keys:
                self._known[k] = None
                self._known.move_to_end(k)
            while len(self._known) > REMEMBERED_KEYS:
                self._known.popitem(last=False)

    def _write(self, keys: list[str], rows: np.ndarray) -> None:
        t0 = time.monotonic()
        ok = self.store.put([(k, record.encode(k, rows[i].data)) for i, k in enumerate(keys)])
        with self._lock:
            self._s.kv_store_pending_write_bytes -= rows.nbytes
            self._s.kv_store_writes += 1
            self._s.kv_store_write_seconds += time.monotonic() - t0
            if not ok:
                self._s.kv_store_dropped_writes += len(keys)
                for k in keys:  # not stored: a later prefill may write them
                    self._known.pop(k, None)
        if not ok:
            self._back_off("a write failed")

    # ---- state ------------------------------------------------------------------------------
    def stats(self) -> KVStoreStats:
        with self._lock:
            s = KVStoreStats(**{f: getattr(self._s, f) for f in KVStoreStats.__struct_fields__})
        st = self.store.stats
        s.kv_store_bytes_read, s.kv_store_bytes_written, s.kv_store_errors = st.bytes_in, st.bytes_out, st.errors
        return s

    def disable(self, reason: str) -> None:
        if self._disabled is None:
            self._disabled = reason
            logger.warning("KV store %s: not used any more (%s)", self.name, reason)

    def close(self) -> None:
        self._fetcher.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=False)
        self.store.close()
