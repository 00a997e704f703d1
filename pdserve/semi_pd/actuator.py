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

    # ---- the prefill forward cap (gated policies) -------------------------------------------
    # Under a gate that runs one forward at a time (the `timeshare` core policy,
    # semi_pd/step_gate.py) a decode step that arrives while a prefill forward runs waits for
    # all of it: the split decides how often prefill gets the gate, the cap how long it then
    # holds it. The cap is what a prefill forward may take, in tokens, while decode has
    # running requests; alone, prefill runs whole chunks.
    #: one forward at a time: a prefill forward stalls decode for its whole length
    gated: bool = False
    #: the longest prefill forward without a cap (the server's --chunked-prefill-size)
    chunk_tokens: int = 512

    @property
    def prefill_cap(self) -> int | None:
        """Prefill tokens per forward while decode runs; None: no cap (`chunk_tokens`)."""
        return getattr(self, "_prefill_cap", None)

    def set_prefill_cap(self, tokens: int | None) -> bool:
        """Cap prefill forwards at `tokens` while decode runs (None, or >= `chunk_tokens`:
        no cap); from the next prefill step on. True once in effect."""
        if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"a prefill cap is a positive number of tokens or None, got {tokens!r}")
        cap = None if tokens is None or tokens >= self.chunk_tokens else tokens
        if cap != self.prefill_cap:
            self._prefill_cap = cap
            if not hasattr(self, "cap_history"):
                self.cap_history: list[tuple[float, int | None]] = []
            self.cap_history.append((time.time(), cap))
        return True


class InMemorySplit(SplitActuator):
    """Records splits; `history` lists (time, allocation) of every change."""

    def __init__(self, initial: SMAllocation, *, gated: bool = False, chunk_tokens: int = 512) -> None:
        self._current = initial
        self.gated, self.chunk_tokens = gated, chunk_tokens
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
