"""Child processes of `pdserve launch` and of its Ray actors: they die with their parent
(Linux parent-death signal) and are waited for until healthy."""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import subprocess
import time
import urllib.request


def _die_with_parent(parent: int) -> None:
    """In a child before exec: SIGTERM when launch dies, however it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # launch died before prctl took effect
        os._exit(1)


def child_setup(parent: int, cpus=None):
    def setup() -> None:
        _die_with_parent(parent)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def wait_healthy(url: str, proc: subprocess.Popen, deadline: float, path: str = "/health") -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with code {proc.returncode} during startup")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, http.client.HTTPException):
            # HTTPException: BadStatusLine('GET /health HTTP/1.1') when, before the server
            # listens on a port in the ephemeral range, the probe's socket connects to itself
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not become healthy in time")
