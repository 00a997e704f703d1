"""PD figures of issue #3, measured in one run on this machine (2 cores):

1. TTFT of a 256-token prompt at low load (one request at a time), co-located
   `pdserve serve` (both cores) vs 1P1D `pdserve launch`, with the cores split (one
   each: prefill computes on half the machine) and shared (both servers may use both
   cores: the same compute as co-located, so the difference is the PD overhead proper).
2. A mixed load (long prompts arriving while many requests decode), Poisson arrivals,
   through `pdserve bench`: TTFT / TPOT p50 / p99 and goodput at the stated SLO.

    .venv/bin/python benchmarks/bench_pd.py --output bench_out/pd.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, stream_times  # noqa: E402

from pdserve.launch.cli import wait_healthy  # noqa: E402


def start(cmd: list[str], url: str, ready_path: str, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc, time.time() + timeout, ready_path)
    except RuntimeError:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def ttft_256(url: str, n: int) -> float:
    vals = []
    for i in range(n):
        ids = [(i * 7919 + j * 31) % 40000 + 100 for j in range(256)]
        t, _ = stream_times(url, {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
        vals.append(t)
    vals.sort()
    return vals[len(vals) // 2]


def mixed_load(url: str, out_file: str, a) -> dict:
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--backend", "pdserve",
           "--dataset-name", "mixed", "--num-prompts", str(a.num_prompts), "--random-input-len", "128",
           "--random-output-len", "64", "--random-range-ratio", "1.0", "--mixed-long-input-len", "1024",
           "--mixed-long-fraction", "0.125", "--request-rate", str(a.rate), "--seed", "1",
           "--warmup-requests", "2", "--slo-ttft-ms", str(a.slo_ttft_ms), "--slo-tpot-ms", str(a.slo_tpot_ms),
           "--output-file", out_file, "--no-plots", "--disable-tqdm"]
    subprocess.run(cmd, check=True, timeout=900, stdout=subprocess.DEVNULL)
    with open(out_file) as f:
        return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="bench_out/pd.json")
    ap.add_argument("--ttft-samples", type=int, default=7)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--rate", type=float, default=1.0, help="Poisson request rate of the mixed load")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000)
    ap.add_argument("--slo-tpot-ms", type=float, default=100)
    ap.add_argument("--backend", default="tcp", choices=("tcp", "shm"))
    a = ap.parse_args()
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "slo_ttft_ms": a.slo_ttft_ms,
                 "slo_tpot_ms": a.slo_tpot_ms, "rate": a.rate, "num_prompts": a.num_prompts,
                 "transfer_backend": a.backend}
    py = [sys.executable, "-m", "pdserve.cli"]
    bar = tqdm(total=6, desc="bench_pd")
    # co-located: one server on both cores
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(py + ["serve", "--port", str(port), "--max-total-tokens", "65536"], url, "/health")
    try:
        stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
        res["colocated_ttft_256_ms"] = ttft_256(url, a.ttft_samples) * 1000
        bar.update()
        res["colocated_mixed"] = mixed_load(url, a.output + ".colocated.json", a)
        bar.update()
    finally:
        stop(proc)
    # 1P1D, router in front: cores split (one each) and shared (both may use both)
    for split in ("disjoint", "shared"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(py + ["launch", "--port", str(port), "--max-total-tokens", "65536", "--transfer-backend",
                           a.backend, "--bootstrap-port-base", str(free_port()), "--cpu-split", split],
                     url, "/readiness")
        try:
            stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
            res[f"pd_{split}_ttft_256_ms"] = ttft_256(url, a.ttft_samples) * 1000
            bar.update()
            res[f"pd_{split}_mixed"] = mixed_load(url, f"{a.output}.pd_{split}.json", a)
            bar.update()
        finally:
            stop(proc)
    bar.close()
    print("\nTTFT of a 256-token prompt, low load (median of %d): co-located %.1f ms" %
          (a.ttft_samples, res["colocated_ttft_256_ms"]))
    for split in ("disjoint", "shared"):
        res[f"pd_{split}_ttft_overhead_pct"] = 100 * (res[f"pd_{split}_ttft_256_ms"] / res["colocated_ttft_256_ms"] - 1)
        print(f"  1P1D --cpu-split {split:<8}: {res[f'pd_{split}_ttft_256_ms']:.1f} ms, "
              f"PD overhead {res[f'pd_{split}_ttft_overhead_pct']:+.1f} % (target <= 10 %)")
    keys = [("ttft_ms", "median"), ("ttft_ms", "p99"), ("tpot_ms", "median"), ("tpot_ms", "p99")]
    print(f"\nmixed load, Poisson {a.rate}/s, {a.num_prompts} requests, SLO TTFT<={a.slo_ttft_ms} ms, "
          f"TPOT<={a.slo_tpot_ms} ms")
    print(f"{'':<12}" + "".join(f"{k}.{s:<8}" for k, s in keys) + "goodput  attainment  failed")
    for name in ("colocated", "pd_disjoint", "pd_shared"):
        m = res[f"{name}_mixed"]
        row = f"{name:<12}"
        for k, s in keys:
            row += f"{_get(m, k, s):>15.1f}"
        row += f"{_get(m, 'goodput'):>9.2f}{_get(m, 'slo_attainment'):>12.2f}{_get(m, 'failed'):>8.0f}"
        print(row)
    with open(a.output, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {a.output}")
    return 0


def _get(m: dict, key: str, stat: str | None = None) -> float:
    """Reads `pdserve bench` JSON: metrics at the top level or under "metrics"."""
    if m.get("runs"):
        m = m["runs"][0]
    src = m.get("metrics", m)
    v = src.get(key)
    if isinstance(v, dict):
        v = v.get(stat) if stat else None
    elif stat:
        v = src.get(f"{stat}_{key}")
    return float(v) if isinstance(v, (int, float)) else float("nan")


if __name__ == "__main__":
    sys.exit(main())
