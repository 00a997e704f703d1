"""`--kv-store` on real servers, the real model and a real `pdserve kvstore` process: a
mode-null server fills the store; a PD deployment whose prefill server points at the same
store answers the same prompts token for token (fp32) while computing fewer prefill tokens
(its /metrics); a record of the wrong layout is rejected; with the store killed, requests
still succeed; every pool ends free."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import msgspec
import pytest

from pdserve.kvstore import record
from pdserve.kvstore.keys import StoreLayout, model_identity, page_keys
from pdserve.launch.children import wait_healthy
from pdserve.model.paths import default_model_path
from pdserve.net import free_port, free_port_run
from tests.conftest import stop_group

pytestmark = pytest.mark.e2e

SHARED = (
    "You are a careful assistant for a small bakery. The bakery opens at seven in the morning and closes "
    "at six in the evening, every day but Monday. It sells sourdough, rye and spelt bread, croissants, "
    "pain au chocolat, cinnamon rolls and, on Fridays, a plum cake. Prices: sourdough 4.50, rye 4.00, "
    "spelt 5.20, croissant 1.80, pain au chocolat 2.10, cinnamon roll 2.40, plum cake 3.10 a slice. "
    "Orders of more than twenty items must be placed a day ahead. The bakery does not deliver. "
    "Answer questions briefly and politely, in one or two sentences, using only these facts.\n\n"
)
QUESTIONS = ["When does the bakery open?", "How much is a croissant?", "Do you deliver?", "Is there plum cake?"]
SP = {"max_new_tokens": 16, "temperature": 0}
COMMON = ["--dtype", "float32", "--max-total-tokens", "8192"]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    assert m, f"{name} not in {url}/metrics"
    return float(m.group(1))


def generate(url: str, **body) -> dict:
    r = httpx.post(url + "/generate", json={"sampling_params": SP, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def wait_written(url: str) -> None:
    """The server's writes to the store have landed (they leave its scheduler's thread)."""
    deadline = time.time() + 20
    while time.time() < deadline:
        ld = httpx.get(url + "/get_load", timeout=10).json()
        if ld["kv_store_writes"] > 0 and ld["kv_store_pending_write_bytes"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url}: writes to the store did not finish: {ld}")


def assert_free(url: str) -> None:
    deadline = time.time() + 10
    while True:
        ld = httpx.get(url + "/get_load", timeout=10).json()
        if ld["num_used_pages"] == 0 and ld["num_running_reqs"] == 0 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert ld["num_used_pages"] == 0 and ld["num_waiting_reqs"] == 0, (url, ld)


class Deployment:
    """The store, one mode-null server and a 1P1D launch, all with `--kv-store`."""

    def __init__(self) -> None:
        procs = self.procs = []

        def start(*args: str) -> subprocess.Popen:
            procs.append(subprocess.Popen([sys.executable, "-m", "pdserve.cli", *args], start_new_session=True))
            return procs[-1]

        try:
            sport = free_port()
            self.store_url = f"http://127.0.0.1:{sport}"
            self.store = start("kvstore", "--port", str(sport), "--capacity-gb", "1")
            kv = ["--kv-store", self.store_url, "--kv-store-timeout", "5"]
            port = free_port()
            self.null = f"http://127.0.0.1:{port}"
            server = start("serve", "--port", str(port), *COMMON, *kv)
            port = free_port_run(3)
            self.router = f"http://127.0.0.1:{port}"
            # ports follow the router's: prefill +1, decode +2 (the decode server ignores --kv-store)
            self.prefill, self.decode = f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"
            launch = start(
                "launch", "--port", str(port), *COMMON, "--bootstrap-port-base", str(free_port()),
                "--cpu-split", "shared", "--server-args", " ".join(kv),
            )  # fmt: skip
            deadline = time.time() + 300
            wait_healthy(self.store_url, self.store, deadline)
            wait_healthy(self.null, server, deadline)
            for url in (self.prefill, self.decode, self.router):
                wait_healthy(url, launch, deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_group(p)


@pytest.fixture(scope="module")
def dep():
    d = Deployment()
    yield d
    d.stop()


def test_prefill_server_loads_what_another_server_wrote_and_answers_the_same(dep):
    ref = [generate(dep.null, text=SHARED + q) for q in QUESTIONS]
    assert metric(dep.null, "pdserve:kv_store_hit_tokens_total") == 0  # the store was empty: computed
    computed_null = metric(dep.null, "pdserve:prefill_computed_tokens_total")
    wait_written(dep.null)
    assert metric(dep.null, "pdserve:kv_store_written_bytes_total") > 0
    for q, r in zip(QUESTIONS, ref):
        out = generate(dep.router, text=SHARED + q)
        assert out["output_ids"] == r["output_ids"], q
        assert out["meta_info"]["cached_tokens"] >= 16 * 8  # the shared prefix: store or prefix cache
    hit = metric(dep.prefill, "pdserve:kv_store_hit_tokens_total")
    computed = metric(dep.prefill, "pdserve:prefill_computed_tokens_total")
    assert hit >= 16 * 8 and computed <= computed_null - hit, (hit, computed, computed_null)
    assert metric(dep.prefill, "pdserve:kv_store_read_bytes_total") > 0
    assert metric(dep.prefill, "pdserve:kv_store_fetch_seconds_total") > 0
    assert metric(dep.store_url, "pdserve_kvstore_hit_pages_total") >= hit / 16
    assert httpx.get(dep.decode + "/get_load", timeout=10).json().get("kv_store_fetches") is None  # not used
    for url in (dep.null, dep.prefill, dep.decode):
        assert_free(url)


def test_record_of_another_layout_is_rejected(dep):
    ids = [1000 + 7 * i for i in range(40)]  # two full pages, then 8 tokens
    layout = StoreLayout(model_identity(default_model_path()), 16, 30, 3, 64, "float32")
    key = page_keys(layout, ids)[0]
    bad = record.encode(key, b"\0" * 1024)  # a sound record (key, CRC), the wrong size for the pool
    r = httpx.post(dep.store_url + "/put", content=msgspec.msgpack.encode([[key, bad]]), timeout=10)
    assert r.status_code == 204
    ref = generate(dep.null, input_ids=ids)
    assert metric(dep.null, "pdserve:kv_store_rejected_pages_total") == 1
    out = generate(dep.router, input_ids=ids)
    assert out["output_ids"] == ref["output_ids"]
    assert metric(dep.prefill, "pdserve:kv_store_rejected_pages_total") == 1
    for url in (dep.null, dep.prefill):
        assert_free(url)


def test_dead_store_requests_still_succeed(dep):
    os.killpg(dep.store.pid, signal.SIGKILL)
    dep.store.wait(10)
    prompt = SHARED.replace("bakery", "cafe") + QUESTIONS[0]  # new from its first page: looked up
    ref = generate(dep.null, text=prompt)
    assert generate(dep.router, text=prompt)["output_ids"] == ref["output_ids"]
    for url in (dep.null, dep.prefill):
        assert metric(url, "pdserve:kv_store_errors_total") >= 1
    for url in (dep.null, dep.prefill, dep.decode):
        assert_free(url)
