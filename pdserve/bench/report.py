"""What a run leaves behind: the summary table, the JSON result and the PNG plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from pdserve.bench.metrics import BenchMetrics, Stats
from pdserve.bench.runner import RunResult

RESULT_FORMAT = "pdserve-bench/1"
_W = 50  # table width


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _section(title: str) -> str:
    return f"{title:-^{_W}}"


def _row(label: str, value: Any) -> str:
    return f"{label + ':':<40} {value}"


def _stats_rows(short: str, s: Stats) -> list[str]:
    return [
        _row(f"Mean {short} (ms)", _fmt(s.mean)),
        _row(f"Median {short} (ms)", _fmt(s.median)),
        _row(f"P90 {short} (ms)", _fmt(s.p90)),
        _row(f"P99 {short} (ms)", _fmt(s.p99)),
    ]


def summary_table(m: BenchMetrics, header: dict[str, Any]) -> str:
    """The end-of-run table, in the layout of SGLang's bench_serving."""
    lines = [f"{' Serving Benchmark Result ':=^{_W}}"]
    lines += [_row(k, v) for k, v in header.items()]
    lines += [
        _row("Successful requests", m.completed),
        _row("Failed requests", m.failed),
        _row("Benchmark duration (s)", _fmt(m.duration_s)),
        _row("Total input tokens", m.total_input_tokens),
        _row("Total generated tokens", m.total_output_tokens),
        _row("Request throughput (req/s)", _fmt(m.request_throughput)),
        _row("Input token throughput (tok/s)", _fmt(m.input_throughput)),
        _row("Output token throughput (tok/s)", _fmt(m.output_throughput)),
        _row("Total token throughput (tok/s)", _fmt(m.total_throughput)),
        _row("Concurrency", _fmt(m.concurrency)),
        _section("End-to-End Latency"),
        *_stats_rows("E2E Latency", m.e2e_ms),
        _section("Time to First Token"),
        *_stats_rows("TTFT", m.ttft_ms),
        _section("Time per Output Token (excl. 1st token)"),
        *_stats_rows("TPOT", m.tpot_ms),
        _section("Inter-Token Latency"),
        *_stats_rows("ITL", m.itl_ms),
        _section("Goodput (DistServe)"),
    ]
    if m.goodput is None:
        lines.append("n/a (set --slo-ttft-ms and/or --slo-tpot-ms)")
    else:
        slo = [
            f"TTFT <= {m.slo_ttft_ms:g} ms" if m.slo_ttft_ms is not None else "",
            f"TPOT <= {m.slo_tpot_ms:g} ms" if m.slo_tpot_ms is not None else "",
        ]
        lines += [
            _row("SLO", ", ".join(s for s in slo if s)),
            _row("Requests meeting every SLO", m.good_requests),
            _row("Goodput (req/s)", _fmt(m.goodput)),
            _row("SLO attainment (%)", _fmt(100.0 * (m.slo_attainment or 0.0))),
        ]
    lines.append(_section("Time distribution (server-reported)"))
    if not m.phases:
        lines.append("n/a (the server reports no per-phase times)")
    else:
        for phase, v in m.phases.items():
            lines.append(_row(f"{phase.capitalize()} mean (ms)", f"{v['mean_ms']:.2f}  ({100 * v['share']:.1f}%)"))
    if m.errors:
        lines.append(_section("Errors"))
        lines += [f"{n:>6} x {err[: _W * 2]}" for err, n in m.errors.items()]
    lines.append("=" * _W)
    return "\n".join(lines)


def _request_record(o) -> dict[str, Any]:
    return {
        "success": o.success,
        "error": o.error,
        "kind": o.kind,
        "start_s": o.start,
        "prompt_len": o.prompt_len,
        "output_len": o.output_len,
        "ttft_s": o.ttft,
        "latency_s": o.latency,
        "itl_s": o.itl,
        "server": o.server,
    }


def result_dict(results: Sequence[RunResult], config: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of a benchmark: config, server facts, and one entry per run."""
    return {
        "format": RESULT_FORMAT,
        "config": config,
        "server": server,
        "runs": [
            {
                "request_rate": rate_label(r.request_rate),
                "metrics": r.metrics.to_dict(),
                "requests": [_request_record(o) for o in r.outputs],
            }
            for r in results
        ],
    }


def write_json(doc: dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return path


def load_result(path: str) -> dict[str, Any]:
    """Reads a JSON result written by `write_json`; ValueError if it is not one."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != RESULT_FORMAT:
        raise ValueError(f"{path}: not a pdserve bench result (format {RESULT_FORMAT!r})")
    return doc


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(results: Sequence[RunResult], path: str, title: str = "") -> str:
    """One PNG with the CDFs of TTFT, TPOT, ITL and E2E latency, one curve per run."""
    import numpy as np

    from pdserve.bench.metrics import tpot_of

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("TTFT", lambda outs: [o.ttft for o in outs]),
        ("TPOT", lambda outs: [t for t in (tpot_of(o) for o in outs) if t is not None]),
        ("ITL", lambda outs: [g for o in outs for g in o.itl]),
        ("E2E latency", lambda outs: [o.latency for o in outs]),
    ]
    for ax, (name, values_of) in zip(axes.flat, panels):
        for r in results:
            vals = np.sort(np.asarray(values_of([o for o in r.outputs if o.success]), dtype=float) * 1000.0)
            if len(vals):
                ax.step(
                    vals,
                    np.arange(1, len(vals) + 1) / len(vals),
                    where="post",
                    label=f"rate {rate_label(r.request_rate)}",
                )
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title or "latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(results: Sequence[RunResult], path: str, title: str = "") -> str | None:
    """Goodput, throughput and SLO attainment against the request rate (finite
    rates only); None (no file) when fewer than two finite rates were run."""
    runs = sorted((r for r in results if math.isfinite(r.request_rate)), key=lambda r: r.request_rate)
    if len(runs) < 2:
        return None
    plt = _pyplot()
    rates = [r.request_rate for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(rates, [r.metrics.request_throughput for r in runs], "o-", label="throughput (req/s)")
    if runs[0].metrics.goodput is not None:
        left.plot(rates, [r.metrics.goodput for r in runs], "s-", label="goodput (req/s)")
        right.plot(rates, [100 * (r.metrics.slo_attainment or 0.0) for r in runs], "s-", color="C1")
        right.set_ylabel("SLO attainment (%)")
        right.set_ylim(0, 102)
        right.set_title("SLO attainment")
    else:
        right.plot(rates, [r.metrics.ttft_ms.p90 for r in runs], "o-", label="P90 TTFT")
        right.plot(rates, [r.metrics.tpot_ms.p90 for r in runs], "o-", label="P90 TPOT")
        right.set_ylabel("ms")
        right.set_title("latency (no SLO given)")
        right.legend()
    left.set_xlabel("request rate (req/s)")
    left.set_ylabel("req/s")
    left.set_title("throughput and goodput")
    left.legend()
    right.set_xlabel("request rate (req/s)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title or "request-rate sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
