"""The KV cache data service on its own: page keys, records, the LRU, the wrapper that turns
a dead store into misses, and each backend for real (the embedded service as a
`pdserve kvstore` process, Mooncake Store with its own `mooncake_master`)."""

import os
import subprocess
import sys
import time

import httpx
import msgspec
import pytest

from pdserve.kvstore import record
from pdserve.kvstore.base import SafeStore
from pdserve.kvstore.stores import open_store
from pdserve.kvstore.keys import StoreLayout, page_keys
from pdserve.kvstore.memory import MemoryStore
from pdserve.net import free_port
from tests.disagg.helpers import ENGINE_BACKENDS

LAYOUT = StoreLayout(
    "SmolLM2-135M-Instruct.Q4_1.gguf:100", page_size=4, num_layers=2, kv_heads=3, head_dim=8, dtype="float32"
)


def test_keys_chain_prefixes_and_namespaces():
    a = page_keys(LAYOUT, list(range(10)))  # 2 full pages, the partial third has no key
    b = page_keys(LAYOUT, list(range(8)) + [99, 98, 97, 96])
    assert len(a) == 2 and a == b[:2] and len(b) == 3
    assert (
        page_keys(LAYOUT, [0, 1, 2, 3, 9, 9, 9, 9])[0] == a[0]
        and page_keys(LAYOUT, [0, 1, 2, 3, 9, 9, 9, 9])[1] != a[1]
    )
    assert page_keys(LAYOUT, [5, 1, 2, 3, 4, 5, 6, 7])[1] != a[1]  # a key names its whole prefix
    other = StoreLayout(**{**LAYOUT.__dict__, "dtype": "bfloat16"})
    assert page_keys(other, list(range(8))) != a  # another layout never shares a key
    assert page_keys(LAYOUT, list(range(100)), max_pages=3) == page_keys(LAYOUT, list(range(12)))


def test_record_round_trip_and_rejections():
    k = page_keys(LAYOUT, list(range(4)))[0]
    page = bytes(range(256)) * (LAYOUT.page_nbytes // 256) + bytes(LAYOUT.page_nbytes % 256)
    rec = record.encode(k, page)
    assert bytes(record.decode(k, rec, LAYOUT.page_nbytes)) == page
    bad = bytearray(rec)
    bad[-1] ^= 1
    for data, key, n, why in [
        (bytes(bad), k, LAYOUT.page_nbytes, "checksum"),
        (rec[:-1], k, LAYOUT.page_nbytes, "present"),
        (rec, "0" * 64, LAYOUT.page_nbytes, "another key"),
        (rec, k, 16, "needs 16"),
        (b"XXXX" + rec[4:], k, LAYOUT.page_nbytes, "not a pdserve"),
        (rec[:8], k, 4, "shorter"),
    ]:
        with pytest.raises(record.RecordError, match=why):
            record.decode(key, data, n)


def test_memory_store_lru_and_prefix():
    s = MemoryStore(capacity_bytes=300)
    s.put([("a", b"x" * 100), ("b", b"y" * 100), ("c", b"z" * 100)])
    assert s.exists(["a", "b", "c", "d"]) == 3 and s.exists(["b", "zz", "c"]) == 1
    s.get(["a"])  # lookups count as use: the order is now c (oldest), b, a
    s.put([("d", b"w" * 100)])
    assert s.get(["c"]) == [None] and s.get(["a", "b", "d"]) == [b"x" * 100, b"y" * 100, b"w" * 100]
    assert s.used == 300 and s.evicted == 1
    s.put([("huge", b"h" * 301)])  # larger than the store: refused, nothing evicted
    assert s.get(["huge"]) == [None] and len(s) == 3


def test_dead_store_is_a_miss_not_an_error(caplog):
    s = SafeStore(open_store(f"http://127.0.0.1:{free_port()}"), "dead")
    assert s.exists(["0" * 64]) == 0 and s.get(["0" * 64]) == [None]
    s.put([("0" * 64, b"rec")])
    assert s.stats.errors == 3 and "computing without it" in caplog.text
    assert len([r for r in caplog.records if "computing without it" in r.message]) == 1  # rate-limited


def test_unknown_scheme_names_the_flag():
    with pytest.raises(ValueError, match="--kv-store.*unknown scheme 'redis'"):
        open_store("redis://x")


def _round_trip(store):
    keys = page_keys(LAYOUT, list(range(4 * 5)))
    pages = [bytes([i]) * LAYOUT.page_nbytes for i in range(5)]
    store.put([(k, record.encode(k, p)) for k, p in zip(keys[:3], pages)])
    assert store.exists(keys) == 3
    got = store.get(keys)
    assert [bytes(record.decode(k, r, LAYOUT.page_nbytes)) for k, r in zip(keys[:3], got[:3])] == pages[:3]
    assert got[3:] == [None, None]
    return keys


def test_embedded_service_process():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "kvstore", "--port", str(port), "--capacity-gb", "0.001"],
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        store = open_store(url)
        keys = _round_trip(store)
        # a corrupt record is refused with a reason, nothing of it stored
        bad = bytearray(record.encode(keys[4], bytes(LAYOUT.page_nbytes)))
        bad[-1] ^= 1
        r = httpx.post(url + "/put", content=msgspec.msgpack.encode([[keys[4], bytes(bad)]]))
        assert r.status_code == 400 and "checksum" in r.text
        assert httpx.post(url + "/exists", content=msgspec.msgpack.encode(["nothex"])).status_code == 400
        m = httpx.get(url + "/metrics").text
        assert "pdserve_kvstore_pages 3.0" in m and "pdserve_kvstore_hit_pages_total" in m
        store.close()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("backend", [b for b in ENGINE_BACKENDS if b.values[0] == "mooncake"])
def test_mooncake_store(backend):
    rpc = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mooncake_master")
    master = subprocess.Popen(
        [exe, f"-rpc_port={rpc}", "-rpc_address=127.0.0.1", f"-metrics_port={free_port()}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        rec_nbytes = record.HEADER_SIZE + LAYOUT.page_nbytes
        # a batch buffer of 2 records: 5 pages go in 3 batch calls each way
        store = open_store(f"mooncake://127.0.0.1:{rpc}?segment_bytes={16 << 20}&batch_bytes={2 * rec_nbytes}")
        keys = _round_trip(store)
        keys = page_keys(LAYOUT, list(range(4 * 9)))
        pages = [bytes([i + 1]) * LAYOUT.page_nbytes for i in range(9)]
        calls = store.batch_calls
        store.put([(k, record.encode(k, p)) for k, p in zip(keys[4:9], pages[4:9])])
        assert store.batch_calls - calls == 3  # batch_put_from, not one call per page
        calls = store.batch_calls
        got = store.get(keys[4:9], rec_nbytes)
        assert store.batch_calls - calls == 3  # batch_get_into
        assert [bytes(record.decode(k, r, LAYOUT.page_nbytes)) for k, r in zip(keys[4:9], got)] == pages[4:9]
        # a missing key is None; a record larger than its slot still comes back, to be rejected
        assert store.get([keys[3]], rec_nbytes)[0] is None
        got = store.get([keys[0]], rec_nbytes - 8)[0]
        with pytest.raises(record.RecordError, match="layout needs"):
            record.decode(keys[0], got, LAYOUT.page_nbytes - 8)
        store.close()
    finally:
        master.terminate()
        master.wait(10)
