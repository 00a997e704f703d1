"""A Ray actor that runs `pdserve serve` (or `pdserve router`) processes on the node Ray
placed it, and stops them with it: the unit of `pdserve launch --ray` and of the RL
strategies' ranks (pdserve/rl).

The actor owns processes, not requests: clients talk to the servers' HTTP endpoints directly
(the same endpoints any client uses), so each server's work shows in its own /metrics and logs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from pdserve.launch.children import child_setup, wait_healthy


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers bind: a port in TIME_WAIT after a stopped server is free to them
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class RayProcessActor:
    """Plain class; the strategy wraps it with `ray.remote`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.procs: list[subprocess.Popen] = []

    def node(self) -> tuple[str, str]:
        """(Ray node id, node IP) of the node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def start_server(
        self,
        port: int,
        flags: list[str],
        role: str | None,
        bootstrap_port: int | None,
        tp_size: int,
        num_threads: int,
        timeout: float = 300,
        advertise: str | None = None,
    ) -> str:
        """Start `pdserve serve` and wait until it is healthy; returns its URL (at `advertise`,
        else the bind address)."""
        for p in (port, bootstrap_port):
            if p is not None and not port_free(self.host, p):
                raise ValueError(
                    f"port {p} on {self.host} is taken (engine ports are base_port + rank * 500; "
                    f"set strategy_config.base_port)"
                )
        cmd = [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(port),
            "--tp-size",
            str(tp_size),
            "--num-threads",
            str(num_threads),
            *flags,
        ]
        if role is not None:
            cmd += ["--disaggregation-mode", role]
        if bootstrap_port is not None:
            cmd += ["--disaggregation-bootstrap-port", str(bootstrap_port)]
        return self._spawn(cmd, f"http://{advertise or self.host}:{port}", "/health", timeout)

    def start_router(
        self,
        port: int,
        prefill: list[tuple[str, int]],
        decode: list[str],
        timeout: float = 120,
        policy: str | None = None,
    ) -> str:
        if not port_free(self.host, port):
            raise ValueError(f"router port {port} on {self.host} is taken")
        cmd = [
            sys.executable,
            "-m",
            "pdserve.cli",
            "router",
            "--pd-disaggregation",
            "--host",
            self.host,
            "--port",
            str(port),
        ]
        for url, boot in prefill:
            cmd += ["--prefill", url, str(boot)]
        for url in decode:
            cmd += ["--decode", url]
        if policy is not None:
            cmd += ["--policy", policy]
        return self._spawn(cmd, f"http://{self.host}:{port}", "/readiness", timeout)

    def _spawn(self, cmd: list[str], url: str, health: str, timeout: float) -> str:
        # the processes follow the actor down however it ends (parent-death signal)
        proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=child_setup(os.getpid()))
        self.procs.append(proc)
        wait_healthy(url, proc, time.time() + timeout, health)
        return url

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def rss_bytes(self) -> int:
        """RSS of every process this worker started, children included."""
        total = 0
        for proc in self.procs:
            try:
                p = psutil.Process(proc.pid)
                for q in [p, *p.children(recursive=True)]:
                    total += q.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []
