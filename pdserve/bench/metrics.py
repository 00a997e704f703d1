"""The figures of one benchmark run, computed from the per-request outputs.

Definitions (all latencies reported in milliseconds):
- TTFT: request sent -> first output chunk received.
- TPOT (per request): (e2e latency - TTFT) / (output tokens - 1); requests with a
  single output token have none.
- ITL: every gap between consecutive output tokens, pooled over requests (a chunk of
  k tokens counts as k gaps of its delay / k).
- E2E latency: request sent -> last byte of the response.
- Goodput (DistServe): requests that completed AND met every given SLO
  (TTFT <= --slo-ttft-ms, TPOT <= --slo-tpot-ms), per second of the run.
  SLO attainment: that count over all requests sent (failures count as misses).
- Duration: first request sent -> last request finished (warm-up excluded).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from pdserve.bench.backends import PHASE_KEYS, RequestOutput


@dataclass(frozen=True)
class Slo:
    """Service-level objectives; `None` means no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def any(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


@dataclass(frozen=True)
class Stats:
    """Summary of one latency metric in ms; fields are None when there is no sample."""

    count: int
    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @staticmethod
    def of(values_s: Sequence[float]) -> "Stats":
        if len(values_s) == 0:
            return Stats(0, None, None, None, None, None)
        ms = np.asarray(values_s, dtype=float) * 1000.0
        return Stats(
            count=len(ms),
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            p90=float(np.percentile(ms, 90)),
            p99=float(np.percentile(ms, 99)),
            max=float(ms.max()),
        )


@dataclass
class BenchMetrics:
    """Everything a run reports (JSON-serialisable through `to_dict`)."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float  # mean requests in flight: sum of latencies / duration
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    good_requests: int | None = None
    goodput: float | None = None  # requests meeting every SLO per second
    slo_attainment: float | None = None  # share of all requests meeting every SLO
    # phase -> {"mean_ms": ..., "share": ...} over requests that report it; None = n/a
    phases: dict[str, dict[str, float]] | None = None
    errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "BenchMetrics":
        d = dict(d)
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d[key] = Stats(**d[key])
        return BenchMetrics(**d)


def tpot_of(o: RequestOutput) -> float | None:
    """Time per output token after the first, in seconds; None for <= 1 token."""
    if not o.success or o.output_len <= 1:
        return None
    return (o.latency - o.ttft) / (o.output_len - 1)


def meets_slo(o: RequestOutput, slo: Slo) -> bool:
    """True when `o` completed and met every SLO that is set."""
    if not o.success:
        return False
    if slo.ttft_ms is not None and o.ttft * 1000.0 > slo.ttft_ms:
        return False
    tpot = tpot_of(o)
    if slo.tpot_ms is not None and tpot is not None and tpot * 1000.0 > slo.tpot_ms:
        return False
    return True


def _phase_split(done: list[RequestOutput]) -> dict[str, dict[str, float]] | None:
    means = {}
    for key in PHASE_KEYS:
        vals = [float(o.server[key]) for o in done if o.server.get(key) is not None]
        if vals:
            means[key] = float(np.mean(vals))
    total = sum(means.values())
    if not means:
        return None
    return {
        key.removesuffix("_time"): {"mean_ms": m * 1000.0, "share": (m / total if total > 0 else 0.0)}
        for key, m in means.items()
    }


def compute_metrics(outputs: Sequence[RequestOutput], duration_s: float, slo: Slo = Slo()) -> BenchMetrics:
    """Figures for one run of `outputs` that took `duration_s` seconds."""
    done = [o for o in outputs if o.success]
    failed = len(outputs) - len(done)
    dur = max(duration_s, 1e-9)
    n_in = sum(o.prompt_len for o in done)
    n_out = sum(o.output_len for o in done)
    tpots = [t for t in (tpot_of(o) for o in done) if t is not None]
    m = BenchMetrics(
        completed=len(done),
        failed=failed,
        duration_s=duration_s,
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        request_throughput=len(done) / dur,
        input_throughput=n_in / dur,
        output_throughput=n_out / dur,
        total_throughput=(n_in + n_out) / dur,
        concurrency=sum(o.latency for o in done) / dur,
        ttft_ms=Stats.of([o.ttft for o in done]),
        tpot_ms=Stats.of(tpots),
        itl_ms=Stats.of([gap for o in done for gap in o.itl]),
        e2e_ms=Stats.of([o.latency for o in done]),
        phases=_phase_split(done),
        errors=dict(Counter(o.error for o in outputs if not o.success).most_common()),
    )
    if slo.any:
        good = sum(meets_slo(o, slo) for o in outputs)
        m.slo_ttft_ms, m.slo_tpot_ms = slo.ttft_ms, slo.tpot_ms
        m.good_requests = good
        m.goodput = good / dur
        m.slo_attainment = good / len(outputs) if outputs else 0.0
    return m
