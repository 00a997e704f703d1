"""`pdserve launch` stopped by SIGKILL or SIGHUP leaves nothing behind: servers, their
scheduler processes and the router all exit (parent-death signal / SIGHUP handler)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pdserve.launch.cli import wait_healthy
from pdserve.net import free_port, free_port_run


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(d))
    return tree


def descendants(pid: int) -> set[int]:
    tree, out, todo = children_of(), set(), [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_launch() -> tuple[subprocess.Popen, int]:
    port = free_port_run(3)
    boot = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "launch",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-total-tokens",
            "2048",
            "--transfer-backend",
            "fake",
            "--bootstrap-port-base",
            str(boot),
            "--cpu-split",
            "shared",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, port


def wait_for_tree(proc: subprocess.Popen, n: int, timeout: float = 120) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "launch exited early"
        d = descendants(proc.pid)
        if len(d) >= n:
            return d
        time.sleep(0.2)
    raise AssertionError(f"launch did not start {n} processes in time")


def assert_all_gone(pids: set[int], timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for p in left:  # don't leak them into the rest of the suite
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"still running after {timeout} s: {left}"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_launch_killed_leaves_no_process(sig):
    proc, port = start_launch()
    try:
        if sig == signal.SIGKILL:  # the whole deployment, router included
            wait_healthy(f"http://127.0.0.1:{port}", proc, time.time() + 180, "/readiness")
            pids = descendants(proc.pid)
            assert len(pids) >= 5, pids  # 2 servers, 2 schedulers, the router
        else:  # while the servers start: both servers and their schedulers
            pids = wait_for_tree(proc, 4)
        proc.send_signal(sig)
        proc.wait(30)
        assert_all_gone(pids | descendants(proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
