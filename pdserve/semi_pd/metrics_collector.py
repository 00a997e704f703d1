"""SLO metrics of Semi-PD over a sliding window: TTFT and TPOT percentiles, throughput,
arrival rate and the prefill / decode queue lengths, plus the per-step timings the latency
model is fitted on.

    mc = SemiPDMetricsCollector(window_size_seconds=30.0)
    mc.record_request_arrival("req_1", input_length=1024)
    mc.record_first_token("req_1")
    mc.record_request_completion("req_1", output_length=256)
    mc.get_real_time_metrics()["ttft_p95_ms"]

Timestamps default to `clock()` (monotonic seconds); tests and simulations pass their own.
A TTFT sample counts at its first token (a TTFT problem shows before the request ends);
a TPOT sample at completion: (completion - first token) / (output_length - 1), only for
outputs of two tokens or more. Percentiles interpolate linearly between samples; with no
sample a percentile reads 0.0 and its `num_*_samples` count is 0.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Pending:
    arrival: float
    input_length: int
    first_token: float | None = None


@dataclass(frozen=True)
class StepSample:
    """One timed forward of a worker: `size` tokens (prefill) or requests (decode), at `share` %."""

    time: float
    size: int
    seconds: float
    share: float
    seq: int = 0  # order of recording (the latency model takes each sample once)


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class SemiPDMetricsCollector:
    """Thread-safe; every sample older than `window_size_seconds` is dropped."""

    def __init__(
        self,
        window_size_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = 1_000_000,
    ) -> None:
        if not (window_size_seconds > 0):
            raise ValueError(f"window_size_seconds must be > 0, got {window_size_seconds}")
        self.window = float(window_size_seconds)
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._max_pending = max_pending
        self._arrivals: deque[tuple[float, int]] = deque()  # (time, input_length)
        # (first token time, seconds, arrival time): measured from arrival to first token
        self._ttft: deque[tuple[float, float, float]] = deque()
        # (completion time, seconds per token, first token time): measured from first token to completion
        self._tpot: deque[tuple[float, float, float]] = deque()
        self._done: deque[tuple[float, int]] = deque()  # (completion time, output_length)
        self._joint: deque[tuple[float, float, float | None]] = deque()  # (completion time, ttft, tpot)
        self._prefill_steps: deque[StepSample] = deque()
        self._decode_steps: deque[StepSample] = deque()
        self._start = clock()
        self._seq = 0
        self.totals = {"arrived": 0, "first_tokens": 0, "completed": 0, "aborted": 0}

    # ---- recording ----------------------------------------------------------------------
    def record_request_arrival(self, request_id: str, input_length: int, timestamp: float | None = None) -> None:
        t = self.clock() if timestamp is None else timestamp
        with self._lock:
            if len(self._pending) >= self._max_pending:
                raise RuntimeError(f"more than {self._max_pending} requests in flight: are completions recorded?")
            self._pending[request_id] = _Pending(t, int(input_length))
            self._arrivals.append((t, int(input_length)))
            self.totals["arrived"] += 1

    def record_first_token(self, request_id: str, timestamp: float | None = None) -> None:
        t = self.clock() if timestamp is None else timestamp
        with self._lock:
            p = self._pending.get(request_id)
            if p is None or p.first_token is not None:
                return  # unknown (arrived before the collector) or already counted
            p.first_token = t
            self._ttft.append((t, t - p.arrival, p.arrival))
            self.totals["first_tokens"] += 1

    def record_request_completion(self, request_id: str, output_length: int, timestamp: float | None = None) -> None:
        t = self.clock() if timestamp is None else timestamp
        with self._lock:
            p = self._pending.pop(request_id, None)
            if p is None:
                return
            if p.first_token is None:  # finished at its first token (e.g. max_new_tokens 1)
                p.first_token = t
                self._ttft.append((t, t - p.arrival, p.arrival))
                self.totals["first_tokens"] += 1
            tpot = (t - p.first_token) / (output_length - 1) if output_length >= 2 else None
            if tpot is not None:
                self._tpot.append((t, tpot, p.first_token))
            self._done.append((t, int(output_length)))
            self._joint.append((t, p.first_token - p.arrival, tpot))
            self.totals["completed"] += 1

    def record_request_abort(self, request_id: str) -> None:
        """A request that will never complete (aborted, failed): no longer queued."""
        with self._lock:
            if self._pending.pop(request_id, None) is not None:
                self.totals["aborted"] += 1

    def record_prefill_batch(
        self, num_tokens: int, seconds: float, share: float, timestamp: float | None = None
    ) -> None:
        """One prefill forward of `num_tokens` tokens that took `seconds` at `share` % of the machine."""
        t = self.clock() if timestamp is None else timestamp
        with self._lock:
            self._seq += 1
            self._prefill_steps.append(StepSample(t, int(num_tokens), float(seconds), float(share), self._seq))

    def record_decode_step(self, batch_size: int, seconds: float, share: float, timestamp: float | None = None) -> None:
        """One decode step over `batch_size` requests that took `seconds` at `share` %."""
        t = self.clock() if timestamp is None else timestamp
        with self._lock:
            self._seq += 1
            self._decode_steps.append(StepSample(t, int(batch_size), float(seconds), float(share), self._seq))

    # ---- reading ------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        cut = now - self.window
        for q in (self._arrivals, self._ttft, self._tpot, self._done, self._joint):
            while q and q[0][0] < cut:
                q.popleft()
        for q in (self._prefill_steps, self._decode_steps):
            while q and q[0].time < cut:
                q.popleft()

    def get_slo_attainment(self, ttft_target_ms: float, tpot_target_ms: float) -> tuple[float, int]:
        """(share of the requests completed in the window that met both targets, how many
        completed); (1.0, 0) when none did. A one-token output has no TPOT to miss."""
        with self._lock:
            self._prune(self.clock())
            done = list(self._joint)
        if not done:
            return 1.0, 0
        ok = sum(1 for _, f, p in done if f * 1000 <= ttft_target_ms and (p is None or p * 1000 <= tpot_target_ms))
        return ok / len(done), len(done)

    def step_samples(self, since: float | None = None) -> tuple[list[StepSample], list[StepSample]]:
        """(prefill, decode) step samples in the window, from `since` on."""
        with self._lock:
            self._prune(self.clock())
            lo = -math.inf if since is None else since
            return ([s for s in self._prefill_steps if s.time >= lo], [s for s in self._decode_steps if s.time >= lo])

    def get_real_time_metrics(self, since: float | None = None) -> dict:
        """Metrics over the window. With `since` (e.g. the last split change) only what was
        measured entirely from `since` on: a TTFT sample counts if its request *arrived* then
        or later (not one that queued under the previous split and got its first token
        after), a TPOT sample if its first token came then or later, completions, arrivals
        and steps if they happened then or later. Latencies in ms, rates per second."""
        now = self.clock()
        with self._lock:
            self._prune(now)
            lo = -math.inf if since is None else since
            ttft = [v for _, v, start in self._ttft if start >= lo]
            tpot = [v for _, v, start in self._tpot if start >= lo]
            done = [n for t, n in self._done if t >= lo]
            arrivals = [n for t, n in self._arrivals if t >= lo]
            prefill_q = sum(1 for p in self._pending.values() if p.first_token is None)
            decode_q = len(self._pending) - prefill_q
            decode_batches = [s.size for s in self._decode_steps if s.time >= lo]
        span = max(1e-9, now - max(now - self.window, self._start, lo))
        ms = 1000.0
        return {
            "window_seconds": span,
            "num_ttft_samples": len(ttft),
            "num_tpot_samples": len(tpot),
            "ttft_p50_ms": percentile(ttft, 50) * ms,
            "ttft_p95_ms": percentile(ttft, 95) * ms,
            "ttft_p99_ms": percentile(ttft, 99) * ms,
            "tpot_p50_ms": percentile(tpot, 50) * ms,
            "tpot_p95_ms": percentile(tpot, 95) * ms,
            "tpot_p99_ms": percentile(tpot, 99) * ms,
            "request_throughput": len(done) / span,
            "token_throughput": sum(done) / span,
            "arrival_rate": len(arrivals) / span,
            "mean_input_length": sum(arrivals) / len(arrivals) if arrivals else 0.0,
            "mean_output_length": sum(done) / len(done) if done else 0.0,
            "mean_decode_batch": sum(decode_batches) / len(decode_batches) if decode_batches else float(decode_q),
            "prefill_queue_length": prefill_q,
            "decode_queue_length": decode_q,
        }
