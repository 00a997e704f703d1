"""What a compute percentage means on CPU (pdserve/semi_pd/cpu_share.py)."""

import os

import pytest

from pdserve.semi_pd.cpu_share import CpuShareManager, cores_for, share_plan


def test_share_plan_on_two_cores():
    p = share_plan(50, 50, [0, 1])
    assert p["prefill"]["cores"] == [0] and p["decode"]["cores"] == [1]  # a spatial split
    assert p["prefill"]["quota_cores"] == 1.0 and p["decode"]["threads"] == 1
    p = share_plan(70, 30, [0, 1])
    assert p["prefill"]["cores"] == [0, 1] and p["decode"]["cores"] == [1]  # overlap on core 1
    assert p["prefill"]["quota_cores"] == pytest.approx(1.4) and p["decode"]["quota_cores"] == pytest.approx(0.6)
    assert p["prefill"]["threads"] == 2


def test_cores_for_bounds():
    cores = list(range(8))
    assert cores_for(1, cores, front=True) == [0]  # never less than one core
    assert cores_for(100, cores, front=False) == cores
    assert cores_for(25, cores, front=False) == [6, 7]


def test_quota_manager_detects_and_cleans_up():
    m = CpuShareManager(tag=f"test{os.getpid()}")
    assert m.kind in ("v1", "v2", "none") and m.describe()
    if m.kind == "none":
        assert m.set_quota("decode", os.getpid(), 0.5) is False
        return
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert m.set_quota("decode", child.pid, 0.5)
        path = m.groups["decode"]
        with open(os.path.join(path, "cgroup.procs")) as f:
            assert str(child.pid) in f.read().split()
        if m.kind == "v1":
            with open(os.path.join(path, "cpu.cfs_quota_us")) as f:
                assert int(f.read()) == 50000
    finally:
        m.close()
        child.kill()
        child.wait()
    assert not os.path.exists(path)
