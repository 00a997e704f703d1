"""When each request is sent: all at once, Poisson, or gamma-distributed arrivals.

Inter-arrival gaps follow a gamma distribution with shape `burstiness` and mean
`1 / request_rate` (vLLM's `benchmark_serving` definition): burstiness 1.0 is a
Poisson process, below 1 arrivals come in bursts, above 1 they are more even.
A rate of `inf` sends every request at time zero.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start of the run at which each request is sent (sorted).

    The first request leaves at 0; the rest follow after gamma-distributed gaps.
    The same (n, rate, burstiness, seed) always gives the same schedule.
    """
    if request_rate <= 0 or math.isnan(request_rate):
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if burstiness <= 0 or math.isnan(burstiness):
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    theta = 1.0 / (request_rate * burstiness)
    gaps = rng.gamma(shape=burstiness, scale=theta, size=num_requests - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def parse_rates(text: str) -> list[float]:
    """`"inf"`, `"4"` or a sweep `"1,2,4,inf"` -> list of rates (requests/s)."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"not a number: {part!r}") from None
        if rate <= 0 or math.isnan(rate):
            raise ValueError(f"rates must be > 0 (or inf), got {part!r}")
        rates.append(rate)
    if not rates:
        raise ValueError("no rate given")
    return rates


def parse_rate_range(text: str) -> list[float]:
    """SGLang's `--request-rate-range START,STOP,STEP` (STOP inclusive when reached)."""
    try:
        start, stop, step = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected START,STOP,STEP, got {text!r}") from None
    if start <= 0 or step <= 0 or stop < start:
        raise ValueError(f"need 0 < START <= STOP and STEP > 0, got {text!r}")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 9) for i in range(n)]
