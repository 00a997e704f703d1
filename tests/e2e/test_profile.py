"""/start_profile and /stop_profile (SGLang's names): a real server writes a torch.profiler
trace of its forward steps into $SGLANG_TORCH_PROFILER_DIR (or the request's output_dir),
named by role; num_steps stops it by itself; misuse is a 400."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from pdserve.engine.profiler import Profiler
from tests.conftest import ServerProc

pytestmark = pytest.mark.e2e


def _ops(path: str) -> set[str]:
    with gzip.open(path, "rt") as f:
        return {e.get("name", "") for e in json.load(f)["traceEvents"]}


def _generate(url: str, n: int = 4) -> None:
    r = httpx.post(url + "/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": n}}, timeout=60)
    assert r.status_code == 200


def test_profile_endpoints_write_traces(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    monkeypatch.setenv("SGLANG_TORCH_PROFILER_DIR", str(env_dir))
    s = ServerProc("--dtype", "float32", "--max-total-tokens", "2048")
    try:
        url = s.url
        r = httpx.post(url + "/stop_profile", timeout=10)
        assert r.status_code == 400 and "not running" in r.json()["error"]["message"]
        for body, needle in (
            ({"num_steps": 0}, "num_steps"),
            ({"activities": ["GPU"]}, "activities"),
            ({"bogus": 1}, "bogus"),
        ):
            r = httpx.post(url + "/start_profile", json=body, timeout=10)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text

        r = httpx.post(url + "/start_profile", timeout=10)
        assert r.status_code == 200, r.text
        path = r.json()["trace_path"]
        assert os.path.dirname(path) == str(env_dir) and path.endswith("-colocated.trace.json.gz")
        assert httpx.post(url + "/start_profile", timeout=10).status_code == 400  # already running
        _generate(url)
        r = httpx.post(url + "/stop_profile", timeout=60)
        assert r.status_code == 200 and r.json()["trace_path"] == path
        assert any(op.startswith("aten::") for op in _ops(path))  # the model's ops were recorded

        # num_steps: the trace is written without /stop_profile
        other = tmp_path / "other"
        r = httpx.get(url + "/start_profile", params=None, timeout=10)  # GET works too (SGLang)
        assert r.status_code == 200
        assert httpx.post(url + "/stop_profile", timeout=60).status_code == 200
        r = httpx.post(url + "/start_profile", json={"output_dir": str(other), "num_steps": 2}, timeout=10)
        assert r.status_code == 200
        path = r.json()["trace_path"]
        _generate(url, 8)
        deadline = time.time() + 30
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.dirname(path) == str(other) and os.path.getsize(path) > 0
        assert httpx.post(url + "/stop_profile", timeout=10).status_code == 400  # it stopped by itself

        # `pdserve bench --profile`: a trace of the measured run (not of the warm-up)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pdserve.cli",
                "bench",
                "--base-url",
                url,
                "--dataset-name",
                "random",
                "--random-input-len",
                "16",
                "--random-output-len",
                "4",
                "--random-range-ratio",
                "1",
                "--num-prompts",
                "2",
                "--output-file",
                str(tmp_path / "b.json"),
                "--disable-tqdm",
                "--no-plots",
                "--profile",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        traces = [line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("profile trace")]
        assert len(traces) == 1 and traces[0].startswith(str(env_dir)) and os.path.exists(traces[0])
    finally:
        s.stop()


def test_trace_names_carry_the_role(tmp_path):
    """PD servers' traces stay apart: the role is in the file name."""
    for role in ("prefill", "decode"):
        p = Profiler(role)
        path = p.start(str(tmp_path))
        assert path.endswith(f"-{role}.trace.json.gz") and p.active
        assert p.stop() == path and os.path.exists(path) and not p.active
    with pytest.raises(ValueError, match="not running"):
        Profiler("decode").stop()
