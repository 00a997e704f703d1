"""`pdserve bench compare A.json B.json ...`: results side by side, one column per run."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

# (row label, getter on a run's metrics dict, number format)
_Getter = Callable[[dict[str, Any]], Any]


def _stat(metric: str, key: str) -> _Getter:
    return lambda m: (m.get(metric) or {}).get(key)


def _phase(name: str) -> _Getter:
    def get(m: dict[str, Any]) -> Any:
        v = (m.get("phases") or {}).get(name)
        return None if v is None else f"{v['mean_ms']:.1f} ({100 * v['share']:.0f}%)"

    return get


ROWS: list[tuple[str, _Getter, str]] = [
    ("completed", lambda m: m["completed"], "d"),
    ("failed", lambda m: m["failed"], "d"),
    ("duration (s)", lambda m: m["duration_s"], ".2f"),
    ("request throughput (req/s)", lambda m: m["request_throughput"], ".3f"),
    ("input tokens/s", lambda m: m["input_throughput"], ".1f"),
    ("output tokens/s", lambda m: m["output_throughput"], ".1f"),
    ("total tokens/s", lambda m: m["total_throughput"], ".1f"),
]
for _metric, _name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
    for _key in ("mean", "median", "p90", "p99"):
        ROWS.append((f"{_name} {_key} (ms)", _stat(_metric, _key), ".1f"))
ROWS += [
    ("goodput (req/s)", lambda m: m.get("goodput"), ".3f"),
    ("SLO attainment (%)", lambda m: None if m.get("slo_attainment") is None else 100 * m["slo_attainment"], ".1f"),
]
for _p in ("queue", "prefill", "transfer", "decode"):
    ROWS.append((f"{_p} ms (share)", _phase(_p), "s"))


def columns(paths: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(label, metrics dict) for every run in every file; sweeps give one column per rate."""
    from pdserve.bench.report import load_result

    cols = []
    for path in paths:
        doc = load_result(path)
        name = os.path.splitext(os.path.basename(path))[0]
        runs = doc["runs"]
        for run in runs:
            label = name if len(runs) == 1 else f"{name}@{run['request_rate']}"
            cols.append((label, run["metrics"]))
    return cols


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    return value if isinstance(value, str) else format(value, fmt)


def comparison_table(cols: Sequence[tuple[str, dict[str, Any]]], markdown: bool = False) -> str:
    """Rows = metrics, columns = runs; rows that are n/a everywhere are left out."""
    header = ["metric"] + [label for label, _ in cols]
    body = []
    for label, get, fmt in ROWS:
        cells = [_cell(get(m), fmt) for _, m in cols]
        if all(c == "n/a" for c in cells):
            continue
        body.append([label] + cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def fmt_row(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in body])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench compare", description=__doc__)
    parser.add_argument("results", nargs="+", metavar="RESULT.json", help="JSON results written by `pdserve bench`")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    try:
        cols = columns(args.results)
    except (OSError, ValueError, KeyError) as e:
        print(f"pdserve bench compare: error: {e}", file=sys.stderr)
        return 1
    print(comparison_table(cols, markdown=args.markdown))
    return 0
