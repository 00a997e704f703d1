"""What a compute percentage means on a CPU, and how a worker is held to it.

The core policy ($PDSERVE_SEMI_PD_CORES, docs/semi_pd.md "What a percentage means on CPU")
decides. For a share of x % of n usable cores (this process's affinity):

- `disjoint` (the default until session 5): round(x/100 * n) whole cores of its own, at least 1, the two roles
  never sharing a core (prefill from the front of the list, decode from the back); torch
  threads = its cores; a CFS quota of x/100 * n cores (cgroup v1 `cpu.cfs_quota_us`, v2
  `cpu.max`), which binds only below the cores the role owns. On 2 cores every split is one
  core each, so prefill at 70 % runs as at 50 %;
- `overlap` (the first version): ceil(x/100 * n) cores, which may overlap the other role's;
  what prefill gets then depends on whether decode is busy;
- `weighted`: all cores and threads for both; the split is a cgroup CPU weight (v1
  `cpu.shares`, v2 `cpu.weight`), no quota: work conserving, x % under contention;
- `timeshare` (default; chosen by measurement, docs/benchmarks.md "Semi-PD, session 5"):
  all cores and threads for both; the resident's step gate
  (semi_pd/step_gate.py) runs one forward at a time and, while both roles have work, gives
  each x % of the time: work conserving, and no two forwards fight for cores.

What a share buys (`effective_share`, % of the machine while the other role is busy; and
`alone_share`, while it is idle) is what the SLO controller plans with and what step timings
are normalised by (`step_share`).

Where no cgroup cpu controller is writable (not root, no controller), quotas and weights do
not apply, and `CpuShareManager.describe()` / the log say so.
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger(__name__)

CFS_PERIOD_US = 100_000  # the kernel's default period
PERIOD_ENV = "PDSERVE_SEMI_PD_CFS_PERIOD_US"  # another period, 1000..1000000 us (docs/semi_pd.md)


def cfs_period_us(environ=None) -> int:
    """The CFS period the quotas are written against: CFS_PERIOD_US, or $PDSERVE_SEMI_PD_CFS_PERIOD_US."""
    raw = (os.environ if environ is None else environ).get(PERIOD_ENV)
    if raw is None or raw == "":
        return CFS_PERIOD_US
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{PERIOD_ENV}={raw!r}: must be an integer number of microseconds") from None
    if not 1000 <= v <= 1_000_000:
        raise ValueError(f"{PERIOD_ENV}={v}: must be in 1000..1000000 us (the kernel's bounds)")
    return v


_V1 = "/sys/fs/cgroup/cpu"
_V2 = "/sys/fs/cgroup"


CORES_ENV = "PDSERVE_SEMI_PD_CORES"  # core policy: timeshare (default), disjoint, overlap, weighted
CORE_POLICIES = ("timeshare", "disjoint", "overlap", "weighted")
CPU_SHARES_PER_CORE = 1024  # cgroup v1 cpu.shares of one nice-0 task (v2 cpu.weight: 100)


def core_policy(environ=None) -> str:
    v = (os.environ if environ is None else environ).get(CORES_ENV) or "timeshare"
    if v not in CORE_POLICIES:
        raise ValueError(f"{CORES_ENV}={v!r}: must be one of {CORE_POLICIES}")
    return v


def cores_for(share: int, cores: list[int], front: bool) -> list[int]:
    """Policy `overlap`: the cores of a role with `share` %, ceil(share/100 * n), from the
    front (prefill) or the back (decode)."""
    k = max(1, min(len(cores), math.ceil(share / 100 * len(cores) - 1e-9)))
    return cores[:k] if front else cores[-k:]


def disjoint_counts(prefill: int, decode: int, n: int) -> tuple[int, int]:
    """Policy `disjoint`: whole cores per role, round(share/100 * n), at least 1 each, never
    more than n together (on one core both roles share it)."""
    if n < 2:
        return 1, 1
    kp = min(n - 1, max(1, round(prefill / 100 * n)))
    kd = min(n - kp, max(1, round(decode / 100 * n)))
    return kp, kd


def share_plan(prefill: int, decode: int, cores: list[int], policy: str | None = None) -> dict[str, dict]:
    """{"prefill": {...}, "decode": {...}} for a split. Per role: "cores" (affinity),
    "threads" (torch intra-op), "quota_cores" (CFS bandwidth limit in cores, None: none),
    "weight" (cgroup v1 cpu.shares, None: the default 1024), "effective_share" (% of the
    machine the role can use while the other role is busy: what the latency model plans
    with) and "alone_share" (% it can use while the other role is idle)."""
    policy = policy or core_policy()
    n = len(cores)
    out = {}
    if policy in ("weighted", "timeshare"):  # work conserving: all cores and threads each
        for role, share in (("prefill", prefill), ("decode", decode)):
            out[role] = {
                "cores": list(cores),
                "threads": n,
                "quota_cores": None,
                # weighted: the kernel divides the cores by cgroup weight; timeshare: the
                # resident's step gate divides the time (semi_pd/step_gate.py), no weight
                "weight": max(2, round(share / 100 * CPU_SHARES_PER_CORE * n)) if policy == "weighted" else None,
                "effective_share": float(share),
                "alone_share": 100.0,
            }
        return out
    if policy == "disjoint":
        kp, kd = disjoint_counts(prefill, decode, n)
        own = {"prefill": cores[:kp], "decode": cores[-kd:]}
    else:
        own = {"prefill": cores_for(prefill, cores, True), "decode": cores_for(decode, cores, False)}
    for role, share in (("prefill", prefill), ("decode", decode)):
        cs = own[role]
        quota = share / 100 * n
        effective = 100 * min(len(cs), quota) / n if policy == "disjoint" else float(share)
        alone = effective if policy == "disjoint" else 100 * min(len(cs), quota) / n
        out[role] = {
            "cores": cs,
            "threads": len(cs),
            "quota_cores": quota,
            "weight": None,
            "effective_share": effective,
            "alone_share": alone,
        }
    return out


def step_share(body: dict, other_busy_fraction: float) -> float:
    """The share a role's step actually had, % of the machine, when the other role was busy
    for `other_busy_fraction` (0..1) of it: the latency model normalises timings by this."""
    f = min(1.0, max(0.0, other_busy_fraction))
    return f * body["effective_share"] + (1.0 - f) * body["alone_share"]


def _all_threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def apply_share_to_self(body: dict) -> None:
    """In a worker: move every thread of this process to `body["cores"]` (sched_setaffinity
    of pid 0 moves only the calling thread) and set torch's intra-op threads."""
    import torch

    cores = [int(c) for c in body["cores"]]
    for tid in _all_threads(os.getpid()):
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that just exited
            pass
    torch.set_num_threads(int(body["threads"]))


class CpuShareManager:
    """The resident's side: one CFS-quota cgroup per worker, where the machine allows it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.period_us = cfs_period_us()
        self.kind = self._detect()
        self.groups: dict[str, str] = {}
        if self.kind == "none":
            logger.warning(
                "Semi-PD: no writable cgroup cpu controller here: shares are applied as cores and "
                "threads only (no CFS bandwidth quota), so shares finer than a core are not enforced"
            )

    @staticmethod
    def _detect() -> str:
        if os.path.exists(os.path.join(_V1, "cpu.cfs_quota_us")) and os.access(_V1, os.W_OK):
            return "v1"
        try:
            with open(os.path.join(_V2, "cgroup.controllers")) as f:
                if "cpu" in f.read().split() and os.access(_V2, os.W_OK):
                    return "v2"
        except OSError:
            pass
        return "none"

    def describe(self) -> str:
        return {
            "v1": f"cgroup v1 CFS quota (period {self.period_us} us) + cores + threads",
            "v2": f"cgroup v2 cpu.max (period {self.period_us} us) + cores + threads",
            "none": "cores + threads only (no writable cgroup cpu controller)",
        }[self.kind]

    def set_quota(self, role: str, pid: int, quota_cores: float | None, weight: int | None = None) -> bool:
        """Hold process `pid` (all its threads) to `quota_cores` cores of CPU time (None: no
        limit) and give it the CPU weight `weight` (cgroup v1 cpu.shares; None: the default
        1024); False where cgroups are not available or writing failed (logged)."""
        if self.kind == "none":
            return False
        quota = -1 if quota_cores is None else max(1000, int(quota_cores * self.period_us))
        shares = CPU_SHARES_PER_CORE if weight is None else max(2, int(weight))
        try:
            if role not in self.groups:
                base = _V1 if self.kind == "v1" else _V2
                path = os.path.join(base, f"pdserve-semipd-{self.tag}-{role}")
                os.makedirs(path, exist_ok=True)
                self.groups[role] = path
            path = self.groups[role]
            if self.kind == "v1":
                with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
                    f.write(str(self.period_us))
                with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
                    f.write(str(quota))
                with open(os.path.join(path, "cpu.shares"), "w") as f:
                    f.write(str(shares))
            else:
                with open(os.path.join(path, "cpu.max"), "w") as f:
                    f.write(f"{'max' if quota < 0 else quota} {self.period_us}")
                with open(os.path.join(path, "cpu.weight"), "w") as f:  # v2: 1..10000, 100 a task
                    f.write(str(min(10000, max(1, round(shares * 100 / CPU_SHARES_PER_CORE)))))
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(pid))
            return True
        except OSError as e:
            logger.warning(
                "Semi-PD: could not set the CPU quota/weight of the %s worker (%s): cores and threads only", role, e
            )
            return False

    def close(self) -> None:
        """Move what is left in the cgroups back to the root and remove them."""
        root = _V1 if self.kind == "v1" else _V2
        for path in self.groups.values():
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = f.read().split()
                for p in pids:
                    with open(os.path.join(root, "cgroup.procs"), "w") as f:
                        f.write(p)
                os.rmdir(path)
            except OSError as e:
                logger.warning("Semi-PD: could not remove cgroup %s: %s", path, e)
        self.groups.clear()
