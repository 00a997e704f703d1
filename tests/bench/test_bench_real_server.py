"""`pdserve bench` against a real `pdserve serve` on the default model: a short run
completes with zero failures, and the server leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from pdserve.net import free_port
from tests.conftest import stop_group

pytestmark = pytest.mark.e2e

try:
    import pdserve.server.serve_cli  # noqa: F401

    _SERVER_IMPORT_ERROR = None
except ImportError as e:  # the server is built by another part of the project
    _SERVER_IMPORT_ERROR = e


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    if _SERVER_IMPORT_ERROR is not None:
        pytest.skip(f"pdserve.server.serve_cli cannot be imported: {_SERVER_IMPORT_ERROR}")
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), "--max-total-tokens", "8192"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"pdserve serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"pdserve serve not healthy after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        yield url
    finally:
        stop_group(proc)
    # no orphans: every process the server started is gone (children get 15 s to
    # finish their own shutdown after the parent exits)
    procs = []
    for pid in family:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"processes left behind by pdserve serve: {[(p.pid, p.name()) for p in alive]}"


def _bench(url: str, out: str, *extra: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "bench",
        "--base-url",
        url,
        "--dataset-name",
        "random",
        "--random-input-len",
        "32",
        "--random-output-len",
        "16",
        "--random-range-ratio",
        "1",
        "--num-prompts",
        "4",
        "--request-rate",
        "inf",
        "--output-file",
        out,
        "--disable-tqdm",
        "--read-timeout",
        "120",
        "--request-timeout",
        "300",
        *extra,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_short_run_has_no_failures(real_server, tmp_path):
    doc = _bench(real_server, str(tmp_path / "gen.json"), "--backend", "pdserve", "--slo-ttft-ms", "60000")
    m = doc["runs"][0]["metrics"]
    assert (m["completed"], m["failed"]) == (4, 0), m["errors"]
    assert m["total_output_tokens"] == 64  # ignore_eos: exactly 16 each
    assert m["ttft_ms"]["mean"] > 0 and m["tpot_ms"]["mean"] > 0 and m["itl_ms"]["count"] == 4 * 15
    assert m["ttft_ms"]["max"] <= m["e2e_ms"]["max"]
    # the co-located server reports its phase times: the split is not n/a
    assert m["phases"] and {"prefill", "decode"} <= set(m["phases"])
    assert doc["server"]["model_info"].get("model_path")


def test_short_run_openai_api(real_server, tmp_path):
    doc = _bench(real_server, str(tmp_path / "oai.json"), "--backend", "pdserve-oai", "--no-plots")
    m = doc["runs"][0]["metrics"]
    assert (m["completed"], m["failed"]) == (4, 0), m["errors"]
    assert m["total_output_tokens"] == 64
