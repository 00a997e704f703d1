"""`--kv-store` with `--tp-size 2` on real servers, the real model and a real `pdserve kvstore`
process. Each rank's pool holds its own KV heads; rank 0 saves and loads every rank's heads
as whole-page records (the same bytes as tp 1, docs/kvstore.md "Tensor parallelism"):

- a tp-2 server answers a prompt, forgets its own prefix cache (/flush_cache), and answers
  it again from the store: the same greedy output (fp32), fewer prompt tokens computed;
- a tp-1 server loads what the tp-2 server wrote and answers the same;
- every pool ends free."""

import subprocess
import sys
import time

import httpx
import pytest

from pdserve.launch.children import wait_healthy
from pdserve.net import free_port
from tests.conftest import stop_group
from tests.kvstore.test_kvstore_serving import COMMON, SHARED, assert_free, generate, metric, wait_written

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def servers():
    procs = []

    def start(*args: str) -> subprocess.Popen:
        procs.append(subprocess.Popen([sys.executable, "-m", "pdserve.cli", *args], start_new_session=True))
        return procs[-1]

    try:
        sport = free_port()
        store_url = f"http://127.0.0.1:{sport}"
        store = start("kvstore", "--port", str(sport), "--capacity-gb", "1")
        kv = ["--kv-store", store_url, "--kv-store-timeout", "5"]
        urls = {}
        for tp in (2, 1):
            port = free_port()
            urls[tp] = (
                f"http://127.0.0.1:{port}",
                start("serve", "--port", str(port), "--tp-size", str(tp), *COMMON, *kv),
            )
        deadline = time.time() + 300
        wait_healthy(store_url, store, deadline)
        for url, proc in urls.values():
            wait_healthy(url, proc, deadline)
        yield urls[2][0], urls[1][0]
    finally:
        for p in reversed(procs):
            stop_group(p)


def test_tp2_server_reloads_its_prefix_from_the_store_and_a_tp1_server_shares_it(servers):
    tp2, tp1 = servers
    prompt = SHARED + "When does the bakery open?"
    first = generate(tp2, text=prompt)  # nothing stored yet: computed, as mode null without a store
    assert metric(tp2, "pdserve:kv_store_hit_tokens_total") == 0
    computed_first = metric(tp2, "pdserve:prefill_computed_tokens_total")
    wait_written(tp2)
    assert httpx.post(tp2 + "/flush_cache", timeout=30).status_code == 200  # its own radix cache: gone
    again = generate(tp2, text=prompt)
    assert again["output_ids"] == first["output_ids"]
    hit = metric(tp2, "pdserve:kv_store_hit_tokens_total")
    computed_again = metric(tp2, "pdserve:prefill_computed_tokens_total") - computed_first
    assert hit >= 16 * 8 and computed_again <= computed_first - hit, (hit, computed_again, computed_first)
    # a tp-1 server: the records are whole pages, so it loads them too
    other = generate(tp1, text=prompt)
    assert other["output_ids"] == first["output_ids"]
    assert metric(tp1, "pdserve:kv_store_hit_tokens_total") == hit
    assert metric(tp1, "pdserve:kv_store_rejected_pages_total") == 0
    for url in (tp2, tp1):
        assert_free(url)
