"""Poll states of a KV sender / receiver (SGLang's `KVPoll` values) and their transitions.

Prefill sender:  Bootstrapping --(every decode rank sent its page indices)--> WaitingForInput
                 --send()--> Transferring --(bytes and metadata handed to decode)--> Success
Decode receiver: Bootstrapping --(prefill route known)--> WaitingForInput
                 --(first KV bytes land)--> Transferring --(all bytes + metadata)--> Success
Any non-terminal state may go to Failed (timeout, heartbeat loss, abort, bad frame).
Success and Failed are terminal.
"""

from __future__ import annotations

import os
import threading
from enum import IntEnum


class KVPoll(IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


# state -> states it may move to (forward only; terminal states have none)
ALLOWED_TRANSITIONS: dict[KVPoll, frozenset[KVPoll]] = {
    KVPoll.Bootstrapping: frozenset({KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Success, KVPoll.Failed}),
    KVPoll.WaitingForInput: frozenset({KVPoll.Transferring, KVPoll.Success, KVPoll.Failed}),
    KVPoll.Transferring: frozenset({KVPoll.Success, KVPoll.Failed}),
    KVPoll.Success: frozenset(),
    KVPoll.Failed: frozenset(),
}

TERMINAL_STATES = frozenset({KVPoll.Success, KVPoll.Failed})


def can_transition(old: KVPoll, new: KVPoll) -> bool:
    return new in ALLOWED_TRANSITIONS[old]


class Waker:
    """A pipe the scheduler loop can sleep on until some transfer endpoint changes state
    (transfer threads write a byte on every change). Without it the loop polled every
    0.5 ms while waiting: on cores shared with a prefill server, each of those 2000 wakeups
    a second could preempt one of prefill's OpenMP threads and stall its whole team."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already signalled (pipe full) or closing

    def drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass


WAKER = Waker()


class PollState:
    """A thread-safe poll state that only moves forward along ALLOWED_TRANSITIONS.

    Transfer threads and the scheduler thread race (e.g. data lands while a timeout fires):
    `advance` returns False and leaves the state alone when the move is not allowed, so a
    late `WaitingForInput` never undoes `Transferring` and nothing leaves a terminal state.
    The first failure reason is kept.
    """

    __slots__ = ("_lock", "_state", "reason")

    def __init__(self, initial: KVPoll = KVPoll.Bootstrapping) -> None:
        self._lock = threading.Lock()
        self._state = initial
        self.reason: str | None = None

    @property
    def state(self) -> KVPoll:
        return self._state

    @property
    def done(self) -> bool:
        return self._state in TERMINAL_STATES

    def advance(self, new: KVPoll) -> bool:
        with self._lock:
            if new == self._state:
                return True
            if not can_transition(self._state, new):
                return False
            self._state = new
        WAKER.wake()
        return True

    def fail(self, reason: str) -> bool:
        """Move to Failed with `reason`; False when already terminal."""
        with self._lock:
            if self._state in TERMINAL_STATES:
                return False
            self._state = KVPoll.Failed
            self.reason = reason
        WAKER.wake()
        return True
