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


def ipc_addr(tag: str) -> str:
    """A fresh ZMQ ipc:// address in the temp directory, unique to this process and call."""
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'pdserve-{os.getpid()}-{uuid.uuid4().hex[:8]}-{tag}')}"
