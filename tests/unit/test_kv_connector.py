"""The scheduler with a KV store (engine/kv_connector.py, kv_store_connector.py) on the tiny
random model: two "servers" (schedulers with their own pools) sharing one store. The second
computes only what the store lacks and answers the same; a corrupt record and a hung store
are misses (a dead one: tests/kvstore/test_kvstore_serving.py); pools end free."""

import random
import threading
import time

import pytest
import torch

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.kv_store_connector import StoreConnector
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner
from pdserve.engine.scheduler import Scheduler
from pdserve.kvstore.base import KVStore
from pdserve.kvstore.keys import StoreLayout, page_keys
from pdserve.kvstore.memory import MemoryStore
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel
from pdserve.sampling_params import SamplingParams
from tests.unit.test_scheduler import assert_all_free, drain

CFG = ModelConfig.tiny()
PS = 4
LAYOUT = StoreLayout("tiny:0", PS, CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, "float32")
SHARED = [random.Random(7).randrange(3, 250) for _ in range(41)]  # 10 full pages + 1 token
PROMPTS = [SHARED + [random.Random(i).randrange(3, 250) for _ in range(n)] for i, n in enumerate([3, 9, 0, 17])]


class Server:
    """One scheduler + runner + pool, as a server's scheduler process holds them."""

    def __init__(self, store: KVStore | None, cache: bool = True, timeout_s: float = 5.0, num_pages: int = 128):
        torch.manual_seed(0)
        self.model = LlamaModel(CFG, torch.float32)
        self.model.init_random(0)
        self.runner = ModelRunner(self.model, num_pages, PS)
        self.kv = None if store is None else StoreConnector(store, "test", LAYOUT, self.runner.kv_data, timeout_s)
        self.sched = Scheduler(
            PageAllocator(num_pages, PS),
            max_running_requests=8,
            chunked_prefill_size=16,
            context_length=512,
            eos_ids=(2,),
            disable_radix_cache=not cache,
            kv_connector=self.kv,
        )

    def run(self, prompts, tag="r", together=False):
        sp = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
        outs = {}
        if together:
            for i, p in enumerate(prompts):
                self.sched.add_request(Req(f"{tag}{i}", p, sp))
            outs = drain(self.sched, self.runner)
        else:
            for i, p in enumerate(prompts):
                self.sched.add_request(Req(f"{tag}{i}", p, sp))
                outs.update(drain(self.sched, self.runner))
        return [outs[f"{tag}{i}"] for i in range(len(prompts))]

    def flush_writes(self):
        self.kv._writer.submit(lambda: None).result(10)

    def computed(self):
        return self.sched.load().prefill_computed_tokens


@pytest.fixture(scope="module")
def ref():
    return Server(None).run(PROMPTS)


def test_second_server_loads_the_shared_prefix_and_answers_the_same(ref):
    store = MemoryStore()
    a = Server(store)
    assert a.run(PROMPTS) == ref
    a.flush_writes()
    keys = page_keys(LAYOUT, SHARED)
    assert store.exists(keys) == len(keys) == 10
    for cache in (True, False):  # with and without its own prefix cache
        b = Server(store, cache=cache)
        assert b.run(PROMPTS, together=not cache) == ref
        st = b.kv.stats()
        assert st.kv_store_hit_tokens >= 40 and st.kv_store_rejected_pages == 0
        # a wrote every full page of every prompt: b computes only what follows the last
        # full page before each prompt's last token (that one always runs: it samples)
        assert b.computed() == sum(len(p) - (len(p) - 1) // PS * PS for p in PROMPTS) < a.computed()
        assert_all_free(b.sched)
    assert_all_free(a.sched)
    # pages b loaded were known to be stored: nothing written twice
    assert b.kv.stats().kv_store_bytes_written == 0


def test_corrupt_record_is_rejected_and_computed(ref):
    store = MemoryStore()
    a = Server(store)
    a.run(PROMPTS[:1])
    a.flush_writes()
    keys = page_keys(LAYOUT, SHARED)
    rec = bytearray(store._items[keys[3]])
    rec[-5] ^= 0x40  # one flipped bit in page 3's bytes
    store._items[keys[3]] = bytes(rec)
    b = Server(store)
    assert b.run(PROMPTS[:1]) == ref[:1]
    st = b.kv.stats()
    assert st.kv_store_rejected_pages == 1 and st.kv_store_hit_tokens == 3 * PS  # pages 0-2 only
    assert_all_free(b.sched)


class HungStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def exists(self, keys):
        self.release.wait(30)
        return 0


def test_hung_store_times_out_then_is_left_alone(ref):
    store = HungStore()
    b = Server(store, timeout_s=0.2)
    t0 = time.monotonic()
    assert b.run(PROMPTS) == ref
    # the first request waits out its timeout; the store is then skipped (backoff)
    assert time.monotonic() - t0 < 5
    st = b.kv.stats()
    assert st.kv_store_timeouts == 1 and st.kv_store_hit_tokens == 0
    store.release.set()
    assert_all_free(b.sched)


@pytest.mark.parametrize("split", [(1, 2), (2, 1), (1, 1, 1)])
def test_tp_rank_pools_share_records_with_a_whole_pool(split):
    """Under tp each rank's pool holds its own heads; the store's records are whole pages (all
    heads, the same bytes as tp 1), so a tp server and a tp-1 server load each other's pages."""
    heads, num_pages, n = 3, 16, 5
    layout = StoreLayout("tiny:0", PS, 2, heads, 8, "float32")
    shape = (num_pages, 2, 2, PS, heads, 8)
    whole = torch.randn(shape)
    ranks = [torch.zeros((num_pages, 2, 2, PS, h, 8)) for h in split]
    store = MemoryStore()
    tokens = list(range(3, 3 + n * PS + 2))
    keys = page_keys(layout, tokens)
    src = StoreConnector(store, "whole", layout, whole, 5.0)
    dst = StoreConnector(store, "tp", layout, ranks, 5.0)
    try:
        src.save(tokens, list(range(n)), 0)  # pages 0..4 of the whole pool
        src._writer.submit(lambda: None).result()  # the writer is done
        f = dst.prefetch(tokens, 0, n)
        f.done.wait(5)
        assert f.stored_pages == n and dst.loadable(f, 0) == n
        dst.load(f, 0, [9, 3, 12, 0, 7])
        got = torch.cat(ranks, dim=4)
        assert torch.equal(got[[9, 3, 12, 0, 7]], whole[:n])
        # and back: the tp pools' pages saved under new keys load into a whole pool
        tokens2 = [t + 1 for t in tokens]
        dst.save(tokens2, [9, 3, 12, 0, 7], 0)
        dst._writer.submit(lambda: None).result()
        back = torch.zeros(shape)
        f2 = StoreConnector(store, "whole2", layout, back, 5.0)
        g = f2.prefetch(tokens2, 0, n)
        g.done.wait(5)
        f2.load(g, 0, list(range(n)))
        assert torch.equal(back[:n], whole[:n])
        assert keys != page_keys(layout, tokens2)
        f2.close()
    finally:
        src.close()
        dst.close()
