"""Small socket helpers shared by the servers, the tests and the benchmarks."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago (bind to 0, read it, close)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_run(n: int, host: str = "127.0.0.1") -> int:
    """A port p such that p .. p+n-1 were all free on `host` a moment ago (`pdserve launch
    --port p` puts its router on p and its servers on the ports after it)."""
    for _ in range(100):
        base = free_port(host)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports found on {host}")


def ipc_addr(tag: str) -> str:
    """A fresh ZMQ ipc:// address in the temp directory, unique to this process and call."""
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'pdserve-{os.getpid()}-{uuid.uuid4().hex[:8]}-{tag}')}"
