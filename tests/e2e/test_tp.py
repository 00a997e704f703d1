"""Tensor parallelism (--tp-size) on the default model: a tp-2 server equals tp 1 token for
token (fp32); PD with different tp sizes on the two sides (prefill 1 -> decode 2 over tcp,
prefill 2 -> decode 1 over shm) equals mode null, a prompt of several chunks included; the extra rank dies with its server; a tp
size the model cannot take is a clear startup error."""

import concurrent.futures as cf
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import ServerProc, free_port
from tests.e2e.test_pd import PROMPTS, SP, Launch, long_prompt_equals_mode_null

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference(server):
    return [
        httpx.post(server.url + "/generate", json={"text": p, "sampling_params": SP}, timeout=120).json()
        for p in PROMPTS
    ]


def _gen(url: str, p: str) -> dict:
    return httpx.post(url + "/generate", json={"text": p, "sampling_params": SP}, timeout=300).json()


def test_tp2_server_equals_tp1(reference):
    s = ServerProc("--dtype", "float32", "--max-total-tokens", "8192", "--tp-size", "2")
    try:
        info = httpx.get(s.url + "/get_server_info", timeout=10).json()
        assert info["tp_size"] == 2
        sched = psutil.Process(s.proc.pid).children()
        ranks = [c for c in sched[0].children() if "tp_worker" in " ".join(c.cmdline())]
        assert len(ranks) == 1, "rank 1 runs in its own process"
        for p, ref in zip(PROMPTS, reference):
            assert _gen(s.url, p)["output_ids"] == ref["output_ids"]
        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:  # batched decode across ranks
            outs = list(ex.map(lambda p: _gen(s.url, p), PROMPTS))
        assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in reference]
        assert s.wait_idle_and_free()["num_used_pages"] == 0
    finally:
        s.stop()
    psutil.wait_procs(ranks, timeout=15)
    assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks), "tp rank left behind"


@pytest.mark.parametrize(
    "backend,split,p_tp,d_tp", [("tcp", "disjoint", 1, 2), ("shm", "shared", 2, 1)], ids=["tcp-p1-d2", "shm-p2-d1"]
)
def test_pd_with_different_tp_sizes(reference, server, backend, split, p_tp, d_tp):
    pd = Launch(backend, split, "--prefill-tp-size", str(p_tp), "--decode-tp-size", str(d_tp))
    try:
        for url, tp in ((pd.prefill, p_tp), (pd.decode, d_tp)):
            assert httpx.get(url + "/get_server_info", timeout=10).json()["tp_size"] == tp
        for p, ref in zip(PROMPTS, reference):
            out = _gen(pd.url, p)
            assert out["output_ids"] == ref["output_ids"], p
            assert out["meta_info"]["transfer_time"] is not None
        with cf.ThreadPoolExecutor(3) as ex:
            outs = list(ex.map(lambda p: _gen(pd.url, p), PROMPTS[:3]))
        assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in reference[:3]]
        long_prompt_equals_mode_null(pd, server)  # its KV sent chunk by chunk, per rank
        ld = httpx.get(pd.decode + "/get_load", timeout=10).json()
        assert ld["kv_transfers_completed"] >= len(PROMPTS) + 4 and ld["kv_transfers_failed"] == 0
    finally:
        pd.stop()


def test_tp_size_the_model_cannot_take_is_a_clear_error():
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--tp-size",
            "4",
            "--max-total-tokens",
            "1024",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode != 0 and "--tp-size 4" in r.stderr and "3 KV heads" in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 170
    r = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "serve", "--tp-size", "0"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "--tp-size" in r.stderr


def test_a_dead_rank_fails_requests_instead_of_hanging():
    s = ServerProc("--dtype", "float32", "--max-total-tokens", "4096", "--tp-size", "2")
    try:
        sched = psutil.Process(s.proc.pid).children()[0]
        rank1 = next(c for c in sched.children() if "tp_worker" in " ".join(c.cmdline()))
        rank1.kill()
        time.sleep(0.5)
        t0 = time.time()
        r = httpx.post(
            s.url + "/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 8}}, timeout=60
        )
        assert r.status_code == 503 and "scheduler process died" in r.text
        assert time.time() - t0 < 30
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503  # a router takes it out
    finally:
        s.stop()
