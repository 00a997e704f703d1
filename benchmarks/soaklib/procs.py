"""The soak's processes: a prefill server, a decode server and the router, each in its own
process group and restartable on the same ports; RSS of each process and its children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from pdserve.launch.cli import wait_healthy
from pdserve.net import free_port

PY = [sys.executable, "-m", "pdserve.cli"]
# short disaggregation timeouts: a dead peer is noticed in seconds, not SGLang's 300 s
DISAGG_ENV = {
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "20",
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "20",
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "1",
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "3",
}


class Proc:
    """One server or the router, in its own process group, restartable on the same ports."""

    def __init__(
        self, name: str, cmd: list[str], url: str, ready: str, log_dir: str, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.cmd, self.url, self.ready = name, cmd, url, ready
        self.env = {**os.environ, **(env or {})}
        self.log_path = os.path.join(log_dir, f"soak-{name}.log")
        self.proc: subprocess.Popen | None = None
        self.incarnation = 0

    def start(self, timeout: float = 300) -> float:
        t0 = time.time()
        self.incarnation += 1
        log = open(self.log_path, "a")
        log.write(f"\n==== start {self.incarnation} at {time.strftime('%H:%M:%S')} ====\n")
        log.flush()
        self.proc = subprocess.Popen(
            self.cmd, start_new_session=True, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_healthy(self.url, self.proc, time.time() + timeout, self.ready)
        return time.time() - t0

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def children(self) -> dict[str, psutil.Process]:
        """This process and each child, named `<name>` and `<name>.<child kind>`."""
        out: dict[str, psutil.Process] = {}
        if self.proc is None or self.proc.poll() is not None:
            return out
        try:
            root = psutil.Process(self.proc.pid)
            out[self.name] = root
            for c in root.children(recursive=True):
                cmd = " ".join(c.cmdline())
                kind = "scheduler" if "scheduler_process" in cmd else "tp_worker" if "tp_worker" in cmd else str(c.pid)
                out[f"{self.name}.{kind}"] = c
        except psutil.Error:
            pass
        return out

    def rss(self) -> dict[str, int]:
        """RSS of this process and each child (bytes), named as in children()."""
        out: dict[str, int] = {}
        for k, p in self.children().items():
            try:
                out[k] = out.get(k, 0) + p.memory_info().rss
            except psutil.Error:
                pass
        return out


def deployment(
    log_dir: str, *, prefill_env: dict[str, str] | None = None, backend: str = "tcp"
) -> tuple[Proc, Proc, Proc]:
    """Prefill, decode and router Procs (not started) on free loopback ports."""
    p_port, d_port, r_port, boot = free_port(), free_port(), free_port(), free_port()
    common = [
        "--dtype",
        "float32",
        "--max-total-tokens",
        "16384",
        "--disaggregation-transfer-backend",
        backend,
        "--log-level",
        "warning",
    ]
    prefill = Proc(
        "prefill",
        PY
        + [
            "serve",
            "--port",
            str(p_port),
            "--disaggregation-mode",
            "prefill",
            "--disaggregation-bootstrap-port",
            str(boot),
            *common,
        ],
        f"http://127.0.0.1:{p_port}",
        "/health",
        log_dir,
        {**DISAGG_ENV, **(prefill_env or {})},
    )
    decode = Proc(
        "decode",
        PY + ["serve", "--port", str(d_port), "--disaggregation-mode", "decode", *common],
        f"http://127.0.0.1:{d_port}",
        "/health",
        log_dir,
        {**DISAGG_ENV, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    router = Proc(
        "router",
        PY
        + [
            "router",
            "--pd-disaggregation",
            "--prefill",
            prefill.url,
            str(boot),
            "--decode",
            decode.url,
            "--port",
            str(r_port),
            "--policy",
            "round_robin",
            "--health-check-interval-secs",
            "1",
            "--health-failure-threshold",
            "1",
            "--health-check-timeout-secs",
            "2",
            "--cb-timeout-duration-secs",
            "2",
            "--request-timeout-secs",
            "120",
            "--retry-max-retries",
            "3",
            "--retry-max-backoff-ms",
            "2000",
            "--log-level",
            "warn",
        ],
        f"http://127.0.0.1:{r_port}",
        "/health",
        log_dir,
    )
    prefill.bootstrap_port = boot
    return prefill, decode, router
