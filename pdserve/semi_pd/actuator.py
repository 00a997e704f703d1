"""Where a split chosen by the SLO-aware controller goes.

`SplitActuator` is the interface the controller drives: the serving path implements it
(semi_pd/split_mechanisms.py: `InPlaceSplit` re-pins the workers, `RotationSplit` starts
standby workers with the new shares). `InMemorySplit` records the split and applies nothing:
for tests and for using the controller as a library (the caller reads `current` and applies
it itself).
"""

from __future__ import annotations

import abc
import threading
import time

from pdserve.semi_pd.allocation import SMAllocation


class SplitActuator(abc.ABC):
    """Holds the current split and changes it."""

    @property
    @abc.abstractmethod
    def current(self) -> SMAllocation:
        """The split in effect."""

    @abc.abstractmethod
    def request_sm_reallocation(self, allocation: SMAllocation) -> bool:
        """Move to `allocation`; True once it is in effect (or on its way, for a rotation
        that completes asynchronously), False when it was refused."""

    def effective_shares(self, allocation: SMAllocation) -> tuple[float, float]:
        """(prefill, decode) %: the compute each role can actually use at `allocation`. The
        nominal shares here; a machine where a share buys whole cores (CPU) says less
        (cpu_share.share_plan), and the controller plans with this."""
        return float(allocation.prefill_percentage), float(allocation.decode_percentage)


class InMemorySplit(SplitActuator):
    """Records splits; `history` lists (time, allocation) of every change."""

    def __init__(self, initial: SMAllocation) -> None:
        self._current = initial
        self._lock = threading.Lock()
        self.history: list[tuple[float, SMAllocation]] = [(time.monotonic(), initial)]

    @property
    def current(self) -> SMAllocation:
        return self._current

    def request_sm_reallocation(self, allocation: SMAllocation) -> bool:
        if not isinstance(allocation, SMAllocation):
            raise TypeError(f"expected an SMAllocation, got {type(allocation).__name__}")
        with self._lock:
            if allocation != self._current:
                self._current = allocation
                self.history.append((time.monotonic(), allocation))
        return True


ACTUATORS: dict[str, type[SplitActuator]] = {"in_memory": InMemorySplit}


def create_actuator(name: str, initial: SMAllocation) -> SplitActuator:
    """An actuator by registry name (in_memory; the rotation manager joins when it exists)."""
    try:
        cls = ACTUATORS[name]
    except KeyError:
        raise ValueError(f"unknown split actuator {name!r}; one of {sorted(ACTUATORS)}") from None
    return cls(initial)
