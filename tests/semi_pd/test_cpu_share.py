"""What a compute percentage means on CPU (pdserve/semi_pd/cpu_share.py)."""

import os

import pytest

from pdserve.semi_pd.allocation import SMAllocation
from pdserve.semi_pd.cpu_share import (
    CORES_ENV,
    PERIOD_ENV,
    CpuShareManager,
    cfs_period_us,
    cores_for,
    share_plan,
    step_share,
)
from pdserve.semi_pd.split_mechanisms import InPlaceSplit


def test_share_plan_on_two_cores():
    p = share_plan(50, 50, [0, 1], policy="disjoint")
    assert p["prefill"]["cores"] == [0] and p["decode"]["cores"] == [1]  # a spatial split
    assert p["prefill"]["quota_cores"] == 1.0 and p["decode"]["threads"] == 1
    p = share_plan(70, 30, [0, 1], policy="disjoint")
    assert p["prefill"]["cores"] == [0] and p["decode"]["cores"] == [1]  # never a shared core
    assert p["prefill"]["quota_cores"] == pytest.approx(1.4) and p["decode"]["quota_cores"] == pytest.approx(0.6)
    assert p["prefill"]["threads"] == 1
    # what the shares buy: prefill no more than its one core, decode 0.6 of its core
    assert p["prefill"]["effective_share"] == 50 and p["decode"]["effective_share"] == pytest.approx(30)


def test_share_plan_on_eight_cores_and_one():
    p = share_plan(70, 30, list(range(8)), policy="disjoint")
    assert p["prefill"]["cores"] == [0, 1, 2, 3, 4, 5] and p["decode"]["cores"] == [6, 7]
    assert p["prefill"]["effective_share"] == pytest.approx(70) and p["decode"]["effective_share"] == 25
    p = share_plan(95, 5, list(range(8)), policy="disjoint")
    assert len(p["prefill"]["cores"]) == 7 and p["decode"]["cores"] == [7]  # at least one core each
    p = share_plan(70, 30, [3], policy="disjoint")
    assert p["prefill"]["cores"] == p["decode"]["cores"] == [3]  # one core: shared, by quota


def test_overlap_policy_is_the_first_version(monkeypatch):
    monkeypatch.setenv(CORES_ENV, "overlap")
    p = share_plan(70, 30, [0, 1])
    assert p["prefill"]["cores"] == [0, 1] and p["decode"]["cores"] == [1]  # overlap on core 1
    assert p["prefill"]["threads"] == 2 and p["prefill"]["effective_share"] == 70
    monkeypatch.setenv(CORES_ENV, "mps")
    with pytest.raises(ValueError, match=CORES_ENV):
        share_plan(50, 50, [0, 1])
    monkeypatch.delenv(CORES_ENV)  # the default since session 5: timeshare (measured best)
    p = share_plan(70, 30, [0, 1])
    assert p["prefill"]["cores"] == p["decode"]["cores"] == [0, 1] and p["prefill"]["effective_share"] == 70


def test_weighted_policy_is_work_conserving():
    """Both roles on all cores with all threads; the split is a CPU weight (no quota), so a
    share buys its % while the other role is busy and the whole machine while it is idle."""
    p = share_plan(70, 30, [0, 1], policy="weighted")
    for role in ("prefill", "decode"):
        assert p[role]["cores"] == [0, 1] and p[role]["threads"] == 2 and p[role]["quota_cores"] is None
        assert p[role]["alone_share"] == 100.0
    assert p["prefill"]["weight"] == round(0.7 * 2048) and p["decode"]["weight"] == round(0.3 * 2048)
    assert p["prefill"]["effective_share"] == 70 and p["decode"]["effective_share"] == 30
    # 60 % and 70 % differ (under disjoint on 2 cores they do not): the controller has a lever
    assert share_plan(60, 40, [0, 1], "weighted")["prefill"]["effective_share"] == 60
    assert share_plan(60, 40, [0, 1], "disjoint")["prefill"]["effective_share"] == 50
    assert share_plan(1, 99, [0], "weighted")["prefill"]["weight"] >= 2  # the kernel's minimum


def test_step_share_follows_the_other_roles_activity():
    w = share_plan(70, 30, [0, 1], policy="weighted")["prefill"]
    assert step_share(w, 1.0) == 70 and step_share(w, 0.0) == 100
    assert step_share(w, 0.5) == pytest.approx(85) and step_share(w, 7.0) == 70  # clamped
    d = share_plan(70, 30, [0, 1], policy="disjoint")["prefill"]
    assert step_share(d, 0.0) == step_share(d, 1.0) == 50  # its own core, busy neighbour or not


def test_cores_for_bounds():
    cores = list(range(8))
    assert cores_for(1, cores, front=True) == [0]  # never less than one core
    assert cores_for(100, cores, front=False) == cores
    assert cores_for(25, cores, front=False) == [6, 7]


def test_cfs_period_from_the_environment():
    assert cfs_period_us({}) == 100_000 and cfs_period_us({PERIOD_ENV: "10000"}) == 10_000
    for bad, needle in (("500", "1000..1000000"), ("10ms", "integer number of microseconds")):
        with pytest.raises(ValueError, match=needle):
            cfs_period_us({PERIOD_ENV: bad})


@pytest.mark.parametrize("period", [None, 10_000])
def test_quota_manager_detects_and_cleans_up(period, monkeypatch):
    if period is not None:
        monkeypatch.setenv(PERIOD_ENV, str(period))
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
                assert int(f.read()) == (period or 100_000) // 2
            with open(os.path.join(path, "cpu.cfs_period_us")) as f:
                assert int(f.read()) == (period or 100_000)
            assert m.set_quota("decode", child.pid, None, weight=614)  # weighted: no quota, a weight
            with open(os.path.join(path, "cpu.cfs_quota_us")) as f:
                assert int(f.read()) == -1
            with open(os.path.join(path, "cpu.shares")) as f:
                assert int(f.read()) == 614
    finally:
        m.close()
        child.kill()
        child.wait()
    assert not os.path.exists(path)


class _Resident:
    """The resident as the split mechanisms use it (semi_pd/split_mechanisms.py), recording
    each re-pin and how many plans were computed."""

    def __init__(self, policy: str) -> None:
        self.cores, self.policy, self.pins, self.plans = [0, 1], policy, [], 0

    def plan_for(self, a):
        self.plans += 1
        return share_plan(a.prefill_percentage, a.decode_percentage, self.cores, self.policy)

    def pin_workers(self, a, plan) -> None:
        self.pins.append((a, plan))


def test_in_place_split_keeps_the_plan_it_applied(monkeypatch):
    """The plan a step reads its share from is the one computed when the split was applied,
    under the policy the resident started with: reading it computes nothing and a later change
    of $PDSERVE_SEMI_PD_CORES does not reach a running server."""
    r = _Resident("timeshare")
    s = InPlaceSplit(r, SMAllocation(70, 30))
    assert s.plan == share_plan(70, 30, [0, 1], "timeshare")
    monkeypatch.setenv(CORES_ENV, "disjoint")
    n = r.plans
    for _ in range(100):
        assert s.plan["prefill"]["effective_share"] == 70.0
    assert r.plans == n  # read, not rebuilt
    assert s.request_sm_reallocation(SMAllocation(40, 60))
    assert s.current == SMAllocation(40, 60)
    assert s.plan == share_plan(40, 60, [0, 1], "timeshare") == r.pins[-1][1]
    assert s.plan["decode"]["effective_share"] == 60.0 and s.plan["decode"]["threads"] == 2
