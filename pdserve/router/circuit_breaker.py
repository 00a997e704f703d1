"""Per-worker circuit breaker: closed -> open -> half-open -> closed.

closed     requests flow; `failure_threshold` consecutive failures open it.
open       the worker is left out of selection for `timeout_duration_secs`.
half-open  one probe request at a time; a failure re-opens it, `success_threshold`
           successes in a row close it.

Failures are what the worker did wrong (connection errors, timeouts, retryable
statuses); a 4xx answer is the client's fault and counts as a success.
"""

from __future__ import annotations

import enum
import time
from typing import Callable

from pdserve.router.config import CircuitBreakerConfig


class CircuitState(enum.IntEnum):
    """Values are what the `..._worker_circuit_state` gauge shows."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Not thread-safe: used from the router's event loop only."""

    def __init__(self, config: CircuitBreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.half_open_successes = 0
        self.opened_at = 0.0
        self.probe_in_flight = False
        self.total_opens = 0

    @property
    def state(self) -> CircuitState:
        # open turns half-open by itself once the cooldown has passed
        if self._state is CircuitState.OPEN and self.clock() - self.opened_at >= self.config.timeout_duration_secs:
            self._state = CircuitState.HALF_OPEN
            self.half_open_successes = 0
            self.probe_in_flight = False
        return self._state

    def can_execute(self) -> bool:
        """May the worker be selected now?"""
        if not self.config.enabled:
            return True
        st = self.state
        if st is CircuitState.CLOSED:
            return True
        return st is CircuitState.HALF_OPEN and not self.probe_in_flight

    def on_dispatch(self) -> None:
        """A request was sent to the worker (marks the half-open probe as taken)."""
        if self.config.enabled and self.state is CircuitState.HALF_OPEN:
            self.probe_in_flight = True

    def on_abandon(self) -> None:
        """The request ended without a verdict (client went away): free the probe slot."""
        self.probe_in_flight = False

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.probe_in_flight = False
        if self.state is CircuitState.HALF_OPEN:
            self.half_open_successes += 1
            if self.half_open_successes >= self.config.success_threshold:
                self._state = CircuitState.CLOSED

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        self.probe_in_flight = False
        if not self.config.enabled:
            return
        st = self.state
        if st is CircuitState.HALF_OPEN or (
            st is CircuitState.CLOSED and self.consecutive_failures >= self.config.failure_threshold
        ):
            self._state = CircuitState.OPEN
            self.opened_at = self.clock()
            self.total_opens += 1
