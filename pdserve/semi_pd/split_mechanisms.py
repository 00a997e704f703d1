"""How the resident changes the compute split (the `SplitActuator`s of
`--semi-pd-switch`): `InPlaceSplit` re-pins each worker between two of its steps,
`RotationSplit` starts standby workers with the new shares and switches to them (the
paper's mechanism). Both record when each change took effect and how long it took."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pdserve.semi_pd.actuator import SplitActuator
from pdserve.semi_pd.allocation import SMAllocation
from pdserve.semi_pd.worker_link import ROLES

# The resident (semi_pd/resident_process.py: ResidentProcess) as the mechanisms use it:
# `plan_for(allocation)` (cpu_share.share_plan on its cores and core policy),
# `pin_workers(allocation, plan)`, `gate` (timeshare's step gate or None), `args`,
# `start_worker(role, share)`, `pending_link`, `wake`,
# `running`. Typed loosely: resident_process imports this module, not the other way round.
Resident = Any

logger = logging.getLogger("pdserve.semi_pd")


class InPlaceSplit(SplitActuator):
    """Changes the split in place: each worker re-pins its threads (cores, torch threads)
    between two of its steps, and the resident rewrites its CFS quota."""

    mechanism = "in_place"

    def __init__(self, resident: Resident, initial: SMAllocation) -> None:
        self.resident = resident
        # the split in effect and its share plan, one tuple so a reader never pairs one
        # split with another's plan; replaced (never mutated) when the split changes
        self._state: tuple[SMAllocation, dict] = (initial, resident.plan_for(initial))
        self.history: list[tuple[float, SMAllocation, float]] = []  # (time, split, seconds to take effect)

    @property
    def current(self) -> SMAllocation:
        return self._state[0]

    @property
    def plan(self) -> dict:
        """The share plan (cpu_share.share_plan) of the split in effect, computed once when
        the split was applied: what each step reads its role's share from."""
        return self._state[1]

    @property
    def gated(self) -> bool:
        """The `timeshare` policy's step gate: one forward at a time."""
        return getattr(self.resident, "gate", None) is not None

    @property
    def chunk_tokens(self) -> int:
        return self.resident.args.chunked_prefill_size

    def effective_shares(self, allocation: SMAllocation) -> tuple[float, float]:
        plan = self.resident.plan_for(allocation)
        return plan["prefill"]["effective_share"], plan["decode"]["effective_share"]

    def request_sm_reallocation(self, allocation: SMAllocation) -> bool:
        t0 = time.perf_counter()
        plan = self.resident.plan_for(allocation)
        self.resident.pin_workers(allocation, plan)
        self._state = (allocation, plan)
        self.history.append((time.time(), allocation, time.perf_counter() - t0))
        return True


class RotationSplit(InPlaceSplit):
    """Process rotation, the paper's mechanism (an MPS share cannot change in a live process):
    standby workers start with the new shares on the same weights and pool; once both are
    ready, each role's thread switches to its new worker between two steps and retires the
    old one (delayed switching). One rotation at a time: a request during one is refused."""

    mechanism = "rotation"

    def __init__(self, resident: Resident, initial: SMAllocation) -> None:
        super().__init__(resident, initial)
        self._busy = threading.Lock()
        self.rotation_seconds: list[float] = []  # standby workers started until both switched

    def request_sm_reallocation(self, allocation: SMAllocation) -> bool:
        if not self._busy.acquire(blocking=False):
            logger.warning("Semi-PD: split %s refused: a rotation is under way", allocation)
            return False
        threading.Thread(target=self._rotate, args=(allocation,), name="semi-pd-rotation", daemon=True).start()
        return True

    def _rotate(self, allocation: SMAllocation) -> None:
        r = self.resident
        t0 = time.perf_counter()
        try:
            plan = r.plan_for(allocation)
            new = {role: r.start_worker(role, plan[role]) for role in ROLES}
            for role in ROLES:
                r.pending_link[role] = new[role]
                r.wake[role].set()
            while any(r.pending_link[role] is not None for role in ROLES) and r.running:
                time.sleep(0.005)  # each role's thread takes its new worker after its current step
            self._state = (allocation, plan)
            took = time.perf_counter() - t0
            self.rotation_seconds.append(took)
            self.history.append((time.time(), allocation, took))
            logger.info(
                "Semi-PD rotation to %s done in %.2f s (standby workers started and switched)", allocation, took
            )
        except Exception:
            logger.exception("Semi-PD rotation to %s failed; the old workers keep serving", allocation)
        finally:
            self._busy.release()


SPLIT_MECHANISMS = {"in_place": InPlaceSplit, "rotation": RotationSplit}
