"""Online latency model of Semi-PD: what TTFT and TPOT would be at another split.

Work latency scales as 100 / share (the Semi-PD paper's assumption: a worker with x % of
the machine runs its forward 100/x times slower than with all of it; on CPU this holds for
compute-bound prefill and only roughly for bandwidth-bound decode, see docs/semi_pd.md):

    prefill forward of n tokens at share x:      (a_p * n + b_p) * 100 / x
    decode step of a batch of B at share y:      (a_d * B + b_d) * 100 / y

a_p, b_p, a_d, b_d are least-squares fits on the most recent step timings, each normalised
to a 100 % share first, so timings taken at any split all inform one fit.

Behind a gate that runs one forward at a time (the `timeshare` core policy), the share is
not a speed but a turn: every forward runs on the whole machine, and a decode step that
comes while a prefill forward runs waits for all of it. There (`predict_tpot_gated`):

    prefill's fraction of the time   u = min(x / 100, lambda * S(cap))
    TPOT                             = decode(B) / (1 - u) + prefill(cap) / (mean output - 1)

S(cap) is a mean prompt's prefill at 100 % in forwards of at most `cap` tokens (each forward
pays the fixed b_p); the first term is decode slowed by the prefill time the gate hands out
in between (work conserving: prefill takes only the time it needs, at most its share), the
second one whole capped prefill forward landing inside a request's decode, spread over its
tokens: the tail the split alone cannot cut (docs/semi_pd.md "The prefill cap").

Queueing on top:
  TTFT (prefill as an M/M/1 queue): service S = prefill(mean prompt, x), arrival rate
    lambda; TTFT = S / (1 - lambda * S), infinite when lambda * S >= 1.
  TPOT: one decode step at the observed mean batch B. (Little's law would let B grow as
    decode slows, B = lambda * mean output * TPOT, but at a steady load the batch hardly
    varies, so a_d is poorly determined and that extrapolation swung to infinity in the
    closed-loop tests; at a fixed B only a_d * B + b_d matters, which the samples pin down.)
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from pdserve.semi_pd.metrics_collector import StepSample


class LinearFit:
    """y = a * n + b (a, b >= 0) over the last `max_samples` points."""

    def __init__(self, max_samples: int = 256) -> None:
        self.points: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self.a = 0.0
        self.b = 0.0

    def add(self, n: float, y: float) -> None:
        self.points.append((float(n), float(y)))

    def __len__(self) -> int:
        return len(self.points)

    def fit(self) -> None:
        if not self.points:
            return
        n = np.array([p[0] for p in self.points])
        y = np.array([p[1] for p in self.points])
        if np.ptp(n) > 0:
            a, b = np.polyfit(n, y, 1)
            if a >= 0 and b >= 0:
                self.a, self.b = float(a), float(b)
                return
            if a < 0:  # time falling with size is noise: constant time
                self.a, self.b = 0.0, float(y.mean())
                return
        # one size only, or a negative intercept: time proportional to size
        nz = n > 0
        self.a = float((y[nz] / n[nz]).mean()) if nz.any() else 0.0
        self.b = 0.0 if nz.any() else float(y.mean())

    def __call__(self, n: float) -> float:
        return self.a * n + self.b


class LatencyModel:
    """Fitted on step timings (`SemiPDMetricsCollector.step_samples`); predicts TTFT and
    TPOT in seconds at any split. `ready` once both fits have `min_samples` points."""

    def __init__(self, max_samples: int = 256, min_samples: int = 3) -> None:
        self.prefill = LinearFit(max_samples)  # seconds at 100 % vs tokens
        self.decode = LinearFit(max_samples)  # seconds at 100 % vs batch size
        self.min_samples = min_samples
        self._last = {"prefill": 0, "decode": 0}  # seq of the newest sample added

    def observe(self, prefill: list[StepSample], decode: list[StepSample]) -> None:
        """Add step samples newer than the last ones added, and refit."""
        for kind, fit, samples in (("prefill", self.prefill, prefill), ("decode", self.decode, decode)):
            for smp in samples:
                if smp.seq <= self._last[kind] or smp.share <= 0:
                    continue
                self._last[kind] = smp.seq
                fit.add(smp.size, smp.seconds * smp.share / 100.0)
            fit.fit()

    @property
    def ready(self) -> bool:
        return len(self.prefill) >= self.min_samples and len(self.decode) >= self.min_samples

    def prefill_time(self, tokens: float, share: float) -> float:
        return self.prefill(tokens) * 100.0 / share

    def decode_step_time(self, batch: float, share: float) -> float:
        return self.decode(batch) * 100.0 / share

    def prefill_service(self, tokens: float, cap: int | None = None) -> float:
        """Seconds at 100 % to prefill `tokens` in forwards of at most `cap` tokens (None: one)."""
        forwards = 1 if cap is None else max(1, math.ceil(tokens / max(cap, 1)))
        return self.prefill.a * tokens + self.prefill.b * forwards

    def predict_ttft(
        self, share: float, arrival_rate: float, mean_input_tokens: float, cap: int | None = None
    ) -> float:
        s = self.prefill_service(mean_input_tokens, cap) * 100.0 / share
        rho = arrival_rate * s
        return math.inf if rho >= 1.0 else s / (1.0 - rho)

    def predict_tpot_gated(
        self,
        prefill_share: float,
        batch: float,
        cap: int,
        arrival_rate: float,
        mean_input_tokens: float,
        mean_output_tokens: float,
    ) -> float:
        """Seconds per output token behind a one-forward-at-a-time gate (module docstring):
        prefill forwards of at most `cap` tokens, prefill's share `prefill_share` %."""
        u = min(prefill_share / 100.0, arrival_rate * self.prefill_service(mean_input_tokens, cap))
        if u >= 1.0:
            return math.inf
        step = self.decode(max(batch, 1.0)) / (1.0 - u)
        return step + self.prefill(cap) / max(mean_output_tokens - 1.0, 1.0)

    def predict_tpot(self, share: float, batch: float) -> float:
        """Seconds per output token at decode share `share` with `batch` requests decoding."""
        return self.decode_step_time(max(batch, 1.0), share)
