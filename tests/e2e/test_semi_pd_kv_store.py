"""`--kv-store` under `--enable-semi-pd`, on real servers, the real model and a real `pdserve
kvstore` process: the resident's prefill scheduler looks prompts up, loads the store's pages
into the unified pool (the prefill worker continues from them, the decode worker from the same
pages) and writes what it computed. On second sight of a prompt Semi-PD computes fewer prompt
tokens (no local prefix cache under Semi-PD: the pages come from the store), and its greedy
tokens equal a mode-null server's without a store (fp32)."""

import subprocess
import sys
import time

import httpx
import pytest

from pdserve.launch.children import wait_healthy
from pdserve.net import free_port
from tests.conftest import ServerProc, stop_group
from tests.kvstore.test_kvstore_serving import QUESTIONS, SHARED, generate, metric, wait_written

pytestmark = pytest.mark.e2e

COMMON = ("--dtype", "float32", "--max-total-tokens", "8192")


@pytest.fixture(scope="module")
def servers():
    port = free_port()
    store_url = f"http://127.0.0.1:{port}"
    store = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "kvstore", "--port", str(port), "--capacity-gb", "1"],
        start_new_session=True,
    )
    null = semi = None
    try:
        wait_healthy(store_url, store, time.time() + 120)
        null = ServerProc(*COMMON)  # the reference: computes everything
        semi = ServerProc(*COMMON, "--enable-semi-pd", "--kv-store", store_url, "--kv-store-timeout", "5", timeout=300)
        yield store_url, null, semi
    finally:
        for s in (semi, null):
            if s is not None:
                s.stop()
        stop_group(store)


def test_semi_pd_loads_from_the_store_on_second_sight_and_answers_the_same(servers):
    store_url, null, semi = servers
    ref = [generate(null.url, text=SHARED + q) for q in QUESTIONS[:2]]
    first = generate(semi.url, text=SHARED + QUESTIONS[0])  # first sight: computed, then written
    assert first["output_ids"] == ref[0]["output_ids"]
    assert metric(semi.url, "pdserve:kv_store_hit_tokens_total") == 0
    computed_first = metric(semi.url, "pdserve:prefill_computed_tokens_total")
    wait_written(semi.url)
    assert metric(semi.url, "pdserve:kv_store_written_bytes_total") > 0
    again = generate(semi.url, text=SHARED + QUESTIONS[0])  # same prompt: its full pages loaded
    assert again["output_ids"] == ref[0]["output_ids"]
    hit = metric(semi.url, "pdserve:kv_store_hit_tokens_total")
    computed_again = metric(semi.url, "pdserve:prefill_computed_tokens_total") - computed_first
    assert hit >= 16 * 8 and computed_again <= computed_first - hit, (hit, computed_again, computed_first)
    assert again["meta_info"]["cached_tokens"] >= 16 * 8
    other = generate(semi.url, text=SHARED + QUESTIONS[1])  # shares the prefix's pages only
    assert other["output_ids"] == ref[1]["output_ids"]
    assert metric(semi.url, "pdserve:kv_store_hit_tokens_total") > hit
    assert metric(store_url, "pdserve_kvstore_hit_pages_total") >= hit / 16
    ld = semi.wait_idle_and_free()
    assert ld["num_used_pages"] == 0 and ld["kv_store_fetches"] >= 3, ld
    assert httpx.get(semi.url + "/semi_pd/status", timeout=10).json()["is_running"]
