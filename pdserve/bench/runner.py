"""Sends a workload at a server on an arrival schedule and collects what each request measured.

One `RunConfig` holds everything that shapes the traffic; `run_benchmark` does the
warm-up (excluded from the figures), then one run per request rate (a sweep when
there are several), each with a progress bar and its own `BenchMetrics`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import aiohttp
from tqdm import tqdm

from pdserve.bench.arrivals import arrival_offsets
from pdserve.bench.backends import BACKENDS, RequestInput, RequestOutput, TokenCounter
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import BenchMetrics, Slo, compute_metrics
from pdserve.bench.probe import flush_cache, profile

logger = logging.getLogger(__name__)


class WarmupError(RuntimeError):
    """Every warm-up request failed: the server is up but cannot serve this workload."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that shapes the traffic of a benchmark (the CLI's flags, parsed)."""

    base_url: str
    backend: str = "pdserve"
    model: str | None = None  # OpenAI `model` field
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 1
    warmup_requests: int = 1
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 1800.0  # whole request
    read_timeout_s: float = 300.0  # longest silence while waiting for bytes
    connect_timeout_s: float = 10.0
    flush_cache: bool = False
    profile: bool = False  # /start_profile before each run, /stop_profile after it
    disable_tqdm: bool = False
    slo: Slo = Slo()

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r} unknown; choose from {', '.join(BACKENDS)}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup_requests < 0:
            raise ValueError(f"--warmup-requests must be >= 0, got {self.warmup_requests}")
        for name in ("request_timeout_s", "read_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name[:-2].replace('_', '-')} must be > 0")


@dataclass
class RunResult:
    """One run at one request rate."""

    request_rate: float
    metrics: BenchMetrics
    outputs: list[RequestOutput]


def _session(cfg: RunConfig) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=cfg.request_timeout_s, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
    )
    # limit=0: no client-side connection cap, or queued requests would wait in the
    # pool (inflating TTFT) and spend their timeout there.
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0), read_bufsize=1 << 20)


def _input(cfg: RunConfig, req: BenchRequest, output_len: int | None = None) -> RequestInput:
    return RequestInput(
        prompt=req.prompt,
        prompt_len=req.prompt_len,
        output_len=output_len or req.output_len,
        model=cfg.model,
        ignore_eos=cfg.ignore_eos,
        extra_body=cfg.extra_body,
        kind=req.kind,
    )


async def _send(
    session: aiohttp.ClientSession, cfg: RunConfig, inp: RequestInput, count_tokens: TokenCounter
) -> RequestOutput:
    try:
        return await BACKENDS[cfg.backend](session, cfg.base_url, inp, count_tokens)
    except Exception as e:  # a bug or an odd answer must not kill the whole run
        logger.debug("request failed in the client", exc_info=True)
        return RequestOutput(error=f"client error: {type(e).__name__}: {e}", prompt_len=inp.prompt_len, kind=inp.kind)


async def warm_up(
    session: aiohttp.ClientSession, cfg: RunConfig, requests: Sequence[BenchRequest], count_tokens: TokenCounter
) -> list[RequestOutput]:
    """Sends `cfg.warmup_requests` copies of the first prompts (at most 16 output
    tokens each) concurrently; raises `WarmupError` if all of them fail."""
    if cfg.warmup_requests == 0 or not requests:
        return []
    inputs = [
        _input(cfg, requests[i % len(requests)], min(16, requests[i % len(requests)].output_len))
        for i in range(cfg.warmup_requests)
    ]
    outs = await asyncio.gather(*(_send(session, cfg, inp, count_tokens) for inp in inputs))
    if not any(o.success for o in outs):
        raise WarmupError(f"all {len(outs)} warm-up requests failed; first error: {outs[0].error}")
    return list(outs)


async def run_once(
    session: aiohttp.ClientSession,
    cfg: RunConfig,
    requests: Sequence[BenchRequest],
    rate: float,
    count_tokens: TokenCounter,
) -> tuple[list[RequestOutput], float]:
    """Sends every request at its arrival time (and under the concurrency cap);
    returns the outputs in request order and the run's duration in seconds."""
    offsets = arrival_offsets(len(requests), rate, cfg.burstiness, cfg.seed)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    label = "all at once" if math.isinf(rate) else f"{rate:g} req/s"
    pbar = tqdm(total=len(requests), desc=f"bench ({label})", unit="req", disable=cfg.disable_tqdm)
    t_start = time.perf_counter()

    async def one(req: BenchRequest, offset: float) -> RequestOutput:
        delay = t_start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is not None:
            await sem.acquire()
        try:
            sent = time.perf_counter() - t_start
            out = await _send(session, cfg, _input(cfg, req), count_tokens)
            out.start = sent
        finally:
            if sem is not None:
                sem.release()
        pbar.update(1)
        return out

    try:
        outputs = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
    finally:
        pbar.close()
    return list(outputs), time.perf_counter() - t_start


async def run_benchmark(
    cfg: RunConfig, requests: Sequence[BenchRequest], count_tokens: TokenCounter
) -> list[RunResult]:
    """Warm-up, then one run per rate in `cfg.request_rates`; one `RunResult` each."""
    results = []
    async with _session(cfg) as session:
        await warm_up(session, cfg, requests, count_tokens)
        for rate in cfg.request_rates:
            if cfg.flush_cache:
                err = await flush_cache(session, cfg.base_url)
                if err:
                    logger.warning("flush_cache failed (%s); going on", err)
            if cfg.profile:
                _, err = await profile(session, cfg.base_url, start=True)
                if err:
                    logger.warning("start_profile failed (%s); going on without a trace", err)
            outputs, duration = await run_once(session, cfg, requests, rate, count_tokens)
            if cfg.profile:
                traces, err = await profile(session, cfg.base_url, start=False)
                if err:
                    logger.warning("stop_profile failed (%s)", err)
                for t in traces:
                    print(f"profile trace ({'all at once' if math.isinf(rate) else f'{rate:g} req/s'}): {t}")
            results.append(RunResult(rate, compute_metrics(outputs, duration, cfg.slo), outputs))
    return results
