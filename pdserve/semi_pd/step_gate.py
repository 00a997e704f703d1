"""The `timeshare` core policy's step gate (issue #13): both workers own all the cores, but
only one forward runs at a time, and the split decides how the machine's time is divided
between them while both have work: a weighted fair queue over the two roles.

Each role accrues virtual time: the seconds of its steps divided by its share. When both
wait for the gate, the one with less virtual time goes; a role alone takes it at once (work
conserving: a share is a floor under contention, not a cap). A role back from idle comes
back at most one of its steps behind the other's virtual time, so idleness banks no credit. With 70/30 and
both backlogged, prefill gets 70 % of the wall time at full speed (all cores), decode 30 %.

This is the CPU analogue of a time-sliced device share: what the Semi-PD paper gets from MPS
on a GPU (both phases at once, each with its SMs) needs hardware that runs both at once
without slowing each other, and on 2 cores two forwards at once mostly slow each other (their
OpenMP threads share cores; docs/semi_pd.md "What a percentage means on CPU")."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

ROLES = ("prefill", "decode")
CAP_ENV = "PDSERVE_SEMI_PD_PREFILL_CAP"  # a starting prefill cap, tokens (docs/semi_pd.md "The prefill cap")


def initial_prefill_cap(environ=None) -> int | None:
    """$PDSERVE_SEMI_PD_PREFILL_CAP: prefill forwards of at most this many tokens while decode
    runs, from start-up (the SLO-aware controller moves it from there); unset: no cap."""
    raw = (os.environ if environ is None else environ).get(CAP_ENV) or ""
    if not raw:
        return None
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{CAP_ENV}={raw!r}: must be a whole number of tokens") from None
    if v < 1:
        raise ValueError(f"{CAP_ENV}={v}: must be >= 1 token")
    return v


class StepGate:
    """`acquire(role)` before a role's forward, `release(role)` after it. `shares()` gives
    the current (prefill %, decode %)."""

    def __init__(self, shares: Callable[[], tuple[float, float]], clock: Callable[[], float] = time.perf_counter):
        self.shares = shares
        self.clock = clock
        self._cond = threading.Condition()
        self.holder: str | None = None
        self.vtime = {r: 0.0 for r in ROLES}
        self.waiting: set[str] = set()
        self._t0 = 0.0
        self.wait_seconds = {r: 0.0 for r in ROLES}  # time spent waiting for the other role
        self.held_seconds = {r: 0.0 for r in ROLES}
        self.last_held = {r: 0.0 for r in ROLES}  # the length of each role's last step
        self.releases = {r: 0 for r in ROLES}  # steps finished
        self.seen = {r: 0 for r in ROLES}  # the other role's steps finished at this role's last release

    @staticmethod
    def _other(role: str) -> str:
        return "decode" if role == "prefill" else "prefill"

    def acquire(self, role: str) -> None:
        other = self._other(role)
        t0 = self.clock()
        with self._cond:
            if self.releases[other] > self.seen[role]:
                # the other role finished a step since this role's last one: this role was
                # idle (in steady contention it asks again before the other's step ends). It
                # comes back at most one of its own steps behind the other, so idle time is
                # no credit to starve the other with
                share = self.shares()[0 if role == "prefill" else 1]
                self.vtime[role] = max(self.vtime[role], self.vtime[other] - self.last_held[role] / max(share, 1.0))
            self.waiting.add(role)
            while self.holder is not None or (other in self.waiting and self.vtime[other] < self.vtime[role]):
                self._cond.wait()
            self.waiting.discard(role)
            self.holder = role
            self._t0 = self.clock()
        self.wait_seconds[role] += self._t0 - t0

    def release(self, role: str) -> None:
        with self._cond:
            held = self.clock() - self._t0
            self.held_seconds[role] += held
            self.last_held[role] = held
            self.releases[role] += 1
            self.seen[role] = self.releases[self._other(role)]
            share = self.shares()[0 if role == "prefill" else 1]
            self.vtime[role] += held / max(share, 1.0)
            self.holder = None
            self._cond.notify_all()

    def status(self) -> dict:
        return {"held_seconds": dict(self.held_seconds), "wait_seconds": dict(self.wait_seconds)}
