"""PD TTFT overhead per KV transfer backend at low load: a 256-token prompt, one request at a
time, co-located `pdserve serve` against 1P1D `pdserve launch --cpu-split shared` (both
servers may use both cores: the same compute, so the difference is the PD path proper: the
router, bootstrap, the KV transfer and the handoff to decode).

The co-located server stays up; each backend's deployment comes up in turn, and its samples
alternate with co-located ones request by request (this VM's speed drifts), so each PD
sample is paired with the co-located one taken just before it.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_pd_backends.py \\
        --backends tcp,shm,gloo,nixl,mooncake --output bench_out/pd_backends.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, prompt_ids, stop_server, stream_times, write_json  # noqa: E402
from bench_pd import start, wait_quiet  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="tcp,shm,gloo,nixl,mooncake")
    ap.add_argument("--samples", type=int, default=9)
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    ap.add_argument("--output", default="bench_out/pd_backends.json")
    a = ap.parse_args()
    backends = a.backends.split(",")
    py = [sys.executable, "-m", "pdserve.cli"]
    res: dict = {"samples": a.samples, "backends": {}}
    port = free_port()
    co_url = f"http://127.0.0.1:{port}"
    co = start(py + ["serve", "--port", str(port), "--max-total-tokens", str(a.max_total_tokens)], co_url, "/health")
    bar = tqdm(total=len(backends) * a.samples, desc="pd backends")
    n = 0
    try:
        stream_times(co_url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
        for b in backends:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            pd = start(
                py
                + [
                    "launch",
                    "--port",
                    str(port),
                    "--max-total-tokens",
                    str(a.max_total_tokens),
                    "--transfer-backend",
                    b,
                    "--bootstrap-port-base",
                    str(free_port()),
                    "--cpu-split",
                    "shared",
                ],
                url,
                "/readiness",
            )
            try:
                stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
                wait_quiet([co, pd])
                co_s, pd_s = [], []
                for _ in range(a.samples):
                    for target, out in ((co_url, co_s), (url, pd_s)):
                        body = {"input_ids": prompt_ids(n), "sampling_params": {"max_new_tokens": 1}}
                        n += 1  # distinct prompts: no prefix-cache hits
                        out.append(stream_times(target, body)[0] * 1000)
                    bar.update()
            finally:
                stop_server(pd)
            ratios = [p / c for p, c in zip(pd_s, co_s)]
            res["backends"][b] = {
                "colocated_ms": co_s,
                "pd_ms": pd_s,
                "colocated_median_ms": statistics.median(co_s),
                "pd_median_ms": statistics.median(pd_s),
                "paired_overhead_pct": 100 * (statistics.median(ratios) - 1),
            }
    finally:
        stop_server(co)
        bar.close()
    print(f"\nTTFT of a 256-token prompt at low load, median of {a.samples} (1P1D --cpu-split shared)")
    print(f"{'backend':<10}{'co-located ms':>15}{'1P1D ms':>10}{'overhead (paired)':>19}")
    for b, r in res["backends"].items():
        print(f"{b:<10}{r['colocated_median_ms']:>15.1f}{r['pd_median_ms']:>10.1f}{r['paired_overhead_pct']:>18.1f}%")
    write_json(a.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
