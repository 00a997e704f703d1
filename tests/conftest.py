import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pdserve.launch.cli import wait_healthy
from pdserve.net import free_port

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group we started (start_new_session=True), SIGKILL it after `grace` s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class ServerProc:
    def __init__(self, *extra: str, timeout: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            wait_healthy(self.url, self.proc, time.time() + timeout)
        except RuntimeError:
            self.stop()
            raise

    def load(self) -> dict:
        return httpx.get(self.url + "/get_load", timeout=10).json()

    def wait_idle_and_free(self, timeout: float = 10) -> dict:
        """Polls until no request holds KV pages (aborts are asynchronous)."""
        deadline = time.time() + timeout
        while True:
            ld = self.load()
            if (
                ld["num_used_pages"] == 0 and ld["num_running_reqs"] == 0 and ld["num_waiting_reqs"] == 0
            ) or time.time() > deadline:
                return ld
            time.sleep(0.1)

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture(scope="session")
def server():
    s = ServerProc("--dtype", "float32", "--max-total-tokens", "16384")
    yield s
    s.stop()
