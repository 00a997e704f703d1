"""KV cache data service (`--kv-store`, docs/kvstore.md): a shared-prefix workload over two
co-located servers, without a store, with the embedded service (`pdserve kvstore`) and with
Mooncake Store (`pdserve kvstore --backend mooncake`), in one run.

Workload: `--groups` shared prefixes of `--prefix` tokens, each followed by `--per-group`
distinct suffixes of `--suffix` tokens; one request at a time, streamed, `max_new_tokens`
1 (TTFT is the prefill). The requests of a group alternate between the two servers (A, B,
A, B, ... starting with A for even groups, B for odd ones), so every prefix is first
computed on one server and then needed on the other. Without a store the second server
computes the prefix again; with one it fetches it. Each request is sent once the previous
one's writes to the store have landed (at most 5 s; not counted in any TTFT). Reported per setup: TTFT p50/p99 over all
requests and over the "second sight" requests (a prefix's first request on the second
server), prompt tokens computed by both servers (their /metrics), and the store's traffic.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_kvstore.py \\
        --output bench_out/kvstore.json
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, stop_server, stream_times, write_json  # noqa: E402
from bench_pd import start, wait_quiet  # noqa: E402

METRICS = (
    "prefill_computed_tokens_total",
    "kv_store_hit_tokens_total",
    "kv_store_read_bytes_total",
    "kv_store_written_bytes_total",
    "kv_store_fetches_total",
    "kv_store_fetch_seconds_total",
    "kv_store_errors_total",
    "kv_store_rejected_pages_total",
)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for name in METRICS:
        m = re.search(rf"^pdserve:{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def workload(groups: int, per_group: int, prefix: int, suffix: int, seed: int) -> list[tuple[int, bool, list[int]]]:
    """(server index, second sight, input ids) in sending order."""
    out = []
    for g in range(groups):
        pre = [(seed * 7 + g * 104729 + j * 31) % 40000 + 100 for j in range(prefix)]
        seen: set[int] = set()
        for r in range(per_group):
            s = (g + r) % 2
            second = s not in seen and len(seen) == 1
            seen.add(s)
            tail = [(seed * 13 + g * 7919 + r * 613 + j * 17) % 40000 + 100 for j in range(suffix)]
            out.append((s, second, pre + tail))
    return out


def wait_written(url: str, limit_s: float = 5.0) -> None:
    """Until the server's writes to the store have landed (at most `limit_s`): the next
    request then finds what this one wrote, whatever the store's write speed."""
    deadline = time.time() + limit_s
    while time.time() < deadline and httpx.get(url + "/get_load", timeout=10).json().get(
        "kv_store_pending_write_bytes"
    ):
        time.sleep(0.01)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_setup(name: str, a, seed: int) -> dict:
    py = [sys.executable, "-m", "pdserve.cli"]
    procs = []
    try:
        kv: list[str] = []
        if name != "none":
            sport = free_port()
            if name == "embedded":
                procs.append(start(py + ["kvstore", "--port", str(sport)], f"http://127.0.0.1:{sport}", "/health"))
                kv = ["--kv-store", f"http://127.0.0.1:{sport}"]
            else:  # the master's metrics port (rpc + 1) answers once it is up
                procs.append(
                    start(
                        py + ["kvstore", "--backend", "mooncake", "--port", str(sport)],
                        f"http://127.0.0.1:{sport + 1}",
                        "/metrics",
                    )
                )
                kv = ["--kv-store", f"mooncake://127.0.0.1:{sport}"]
        urls = []
        for _ in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = py + ["serve", "--port", str(port), "--max-total-tokens", str(a.max_total_tokens), *kv]
            procs.append(start(cmd, url, "/health"))
            urls.append(url)
        for url in urls:
            stream_times(url, {"input_ids": [7] * 8, "sampling_params": {"max_new_tokens": 1}})
        wait_quiet(procs)
        before = [metrics(u) for u in urls]
        ttft, second = [], []
        for s, is_second, ids in workload(a.groups, a.per_group, a.prefix, a.suffix, seed):
            t, _ = stream_times(urls[s], {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
            ttft.append(t * 1000)
            if is_second:
                second.append(t * 1000)
            wait_written(urls[s])
        after = [metrics(u) for u in urls]
    finally:
        for p in reversed(procs):
            stop_server(p)
    tot = {k: sum(af[k] - bf[k] for af, bf in zip(after, before)) for k in METRICS}
    return {
        "ttft_ms": ttft,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p99_ms": pct(ttft, 0.99),
        "second_sight_ttft_p50_ms": statistics.median(second),
        "second_sight_ttft_p99_ms": pct(second, 0.99),
        "prefill_computed_tokens": int(tot["prefill_computed_tokens_total"]),
        "store_hit_tokens": int(tot["kv_store_hit_tokens_total"]),
        "store_read_mb": tot["kv_store_read_bytes_total"] / 1e6,
        "store_written_mb": tot["kv_store_written_bytes_total"] / 1e6,
        "store_fetch_mean_ms": 1000 * tot["kv_store_fetch_seconds_total"] / max(1, tot["kv_store_fetches_total"]),
        "store_errors": int(tot["kv_store_errors_total"]),
        "store_rejected_pages": int(tot["kv_store_rejected_pages_total"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="none,embedded,mooncake")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    ap.add_argument("--output", default="bench_out/kvstore.json")
    a = ap.parse_args()
    res: dict = {k: getattr(a, k) for k in ("groups", "per_group", "prefix", "suffix")}
    res["setups"] = {}
    t0 = time.time()
    for i, name in enumerate(a.setups.split(",")):
        # the same prompts for every setup (seed 0); each setup starts fresh servers and store
        res["setups"][name] = run_setup(name, a, seed=0)
        print(f"{name}: done at {time.time() - t0:.0f} s", flush=True)
    n = a.groups * a.per_group
    print(
        f"\n{a.groups} prefixes x {a.per_group} requests ({a.prefix} + {a.suffix} tokens), {n} requests one at "
        "a time over two co-located servers; TTFT in ms"
    )
    hdr = f"{'setup':<10}{'p50':>8}{'p99':>8}{'2nd p50':>9}{'2nd p99':>9}{'computed':>10}{'store hit':>11}{'read MB':>9}{'fetch ms':>10}"
    print(hdr)
    for name, r in res["setups"].items():
        print(
            f"{name:<10}{r['ttft_p50_ms']:>8.0f}{r['ttft_p99_ms']:>8.0f}{r['second_sight_ttft_p50_ms']:>9.0f}"
            f"{r['second_sight_ttft_p99_ms']:>9.0f}{r['prefill_computed_tokens']:>10}{r['store_hit_tokens']:>11}"
            f"{r['store_read_mb']:>9.1f}{r['store_fetch_mean_ms']:>10.1f}"
        )
    write_json(a.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
