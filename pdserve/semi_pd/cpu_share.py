"""What a compute percentage means on a CPU, and how a worker is held to it.

A share of x % of a machine with n usable cores (this process's affinity) is:

- cores: the worker may run on ceil(x/100 * n) cores — prefill takes them from the front of
  the list, decode from the back, so 50/50 on 2 cores is one core each (a spatial split)
  and 70/30 is prefill on both, decode on the second (they overlap on one core);
- threads: torch intra-op threads = its number of cores;
- CPU bandwidth: a CFS quota of x/100 * n cores' worth of CPU time per 100 ms period
  (cgroup v1 `cpu.cfs_quota_us`, or v2 `cpu.max`), which is what makes 70/30 differ from
  100/100 where cores overlap. This is the nearest thing to an MPS SM share: time-sliced,
  enforced by the kernel, and allowed to add up to more than the machine.

Where no cgroup cpu controller is writable (not root, no controller), only cores and
threads apply, and `CpuShareManager.describe()` / the log say so.
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger(__name__)

CFS_PERIOD_US = 100_000
_V1 = "/sys/fs/cgroup/cpu"
_V2 = "/sys/fs/cgroup"


def cores_for(share: int, cores: list[int], front: bool) -> list[int]:
    """The cores of a role with `share` %: from the front (prefill) or the back (decode)."""
    k = max(1, min(len(cores), math.ceil(share / 100 * len(cores) - 1e-9)))
    return cores[:k] if front else cores[-k:]


def share_plan(prefill: int, decode: int, cores: list[int]) -> dict[str, dict]:
    """{"prefill": {"cores", "threads", "quota_cores"}, "decode": {...}} for a split."""
    out = {}
    for role, share, front in (("prefill", prefill, True), ("decode", decode, False)):
        cs = cores_for(share, cores, front)
        out[role] = {"cores": cs, "threads": len(cs), "quota_cores": share / 100 * len(cores)}
    return out


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
            "v1": "cgroup v1 CFS quota + cores + threads",
            "v2": "cgroup v2 cpu.max + cores + threads",
            "none": "cores + threads only (no writable cgroup cpu controller)",
        }[self.kind]

    def set_quota(self, role: str, pid: int, quota_cores: float) -> bool:
        """Hold process `pid` (all its threads) to `quota_cores` cores of CPU time; False
        where quotas are not available or writing failed (logged)."""
        if self.kind == "none":
            return False
        quota = max(1000, int(quota_cores * CFS_PERIOD_US))
        try:
            if role not in self.groups:
                base = _V1 if self.kind == "v1" else _V2
                path = os.path.join(base, f"pdserve-semipd-{self.tag}-{role}")
                os.makedirs(path, exist_ok=True)
                self.groups[role] = path
            path = self.groups[role]
            if self.kind == "v1":
                with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
                    f.write(str(CFS_PERIOD_US))
                with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
                    f.write(str(quota))
            else:
                with open(os.path.join(path, "cpu.max"), "w") as f:
                    f.write(f"{quota} {CFS_PERIOD_US}")
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(pid))
            return True
        except OSError as e:
            logger.warning(
                "Semi-PD: could not set the CPU quota of the %s worker (%s): cores and threads only", role, e
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
