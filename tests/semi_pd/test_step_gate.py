"""The `timeshare` policy's step gate (pdserve/semi_pd/step_gate.py): one forward at a time,
time divided by the split while both roles have work, and no waiting for an idle role."""

from __future__ import annotations

import threading
import time

from pdserve.semi_pd.cpu_share import share_plan
from pdserve.semi_pd.step_gate import StepGate


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run_backlogged(shares, steps=300, prefill_s=0.5, decode_s=0.05):
    """Both roles always have a step ready (two threads); the clock advances by each step's
    length while the gate is held. Returns each role's share of the time."""
    clock = FakeClock()
    gate = StepGate(lambda: shares, clock=clock)
    lock = threading.Lock()
    held = {"prefill": 0.0, "decode": 0.0}
    inside = []
    total = {"n": 0}
    start = threading.Barrier(2)

    def worker(role, seconds):
        start.wait()  # both have work from the start
        while True:
            gate.acquire(role)
            with lock:
                inside.append(role)
                assert len(inside) == 1, inside  # never two forwards at once
                done = total["n"] >= steps
                if not done:
                    total["n"] += 1
                    clock.t += seconds
                    held[role] += seconds
                inside.pop()
            time.sleep(0.0002)  # a forward waits on its worker's socket: the GIL is free meanwhile
            gate.release(role)
            if done:
                return

    ts = [threading.Thread(target=worker, args=a) for a in (("prefill", prefill_s), ("decode", decode_s))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in ts)
    whole = held["prefill"] + held["decode"]
    return held["prefill"] / whole, held["decode"] / whole


def test_backlogged_roles_get_their_shares_of_the_time():
    for p, d in ((70, 30), (50, 50), (20, 80)):
        fp, fd = run_backlogged((p, d))
        assert abs(fp - p / 100) < 0.06 and abs(fd - d / 100) < 0.06, (p, d, fp, fd)


def test_an_idle_role_costs_nothing_and_banks_no_credit():
    clock = FakeClock()
    gate = StepGate(lambda: (70, 30), clock=clock)
    for _ in range(10):  # prefill alone: never waits, whatever its share
        gate.acquire("prefill")
        clock.t += 1.0
        gate.release("prefill")
    assert gate.wait_seconds["prefill"] == 0.0 and gate.held_seconds["prefill"] == 10.0
    # decode was idle all along: it goes at once, and prefill, back from idle later, is not
    # 10 s of credit ahead of decode
    gate.acquire("decode")
    assert gate.wait_seconds["decode"] == 0.0
    clock.t += 0.05
    gate.release("decode")


def test_a_role_back_from_idle_does_not_starve_the_busy_one():
    """Decode ran alone for 100 s; prefill's work arrives while decode is busy. Prefill must
    not get the gate for the next 100 s x 70/30 on stale virtual time (the first version did:
    TPOT 450-500 ms at 0.5 req/s): it comes back at most one of its steps behind."""
    clock = FakeClock()
    gate = StepGate(lambda: (70, 30), clock=clock)
    gate.acquire("prefill")
    clock.t += 0.5
    gate.release("prefill")
    for _ in range(2000):
        gate.acquire("decode")
        clock.t += 0.05
        gate.release("decode")
    gate.acquire("decode")  # decode holds the gate when prefill's next request comes
    got = []
    th = threading.Thread(
        target=lambda: (gate.acquire("prefill"), got.append(dict(gate.vtime)), gate.release("prefill"))
    )
    th.start()
    time.sleep(0.05)
    clock.t += 0.05
    gate.release("decode")
    th.join(timeout=5)
    assert got, "prefill never got the gate"
    # one prefill step behind at most (plus the decode step that was running when it asked)
    assert got[0]["decode"] - got[0]["prefill"] <= 0.5 / 70 + 0.05 / 30 + 1e-9


def test_timeshare_plan_gives_every_role_all_cores():
    p = share_plan(70, 30, [0, 1], policy="timeshare")
    for role in ("prefill", "decode"):
        assert p[role]["cores"] == [0, 1] and p[role]["threads"] == 2
        assert p[role]["quota_cores"] is None and p[role]["weight"] is None and p[role]["alone_share"] == 100
    assert p["prefill"]["effective_share"] == 70 and p["decode"]["effective_share"] == 30
