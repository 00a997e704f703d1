"""Semi-PD against the other deployments on the same cores, model and workload (issue #13).

Deployments (each alone on the machine, one after the other):
  colocated        `pdserve serve` (mode null)
  pd_disjoint      1P1D, `pdserve launch --cpu-split disjoint` (one core each, shm transfer)
  semi_pd_fixed    `pdserve serve --enable-semi-pd` at --split (default 50/50)
  semi_pd_slo      `pdserve serve --enable-semi-pd --enable-slo-aware` from --split, the
                   controller's targets = the benchmark's SLOs, its interval --slo-interval s

Workload: `pdserve bench --dataset-name mixed` (short prompts, 1 in 8 long), Poisson arrivals,
for each rate of --rates. SLOs: --slo-factor x the TTFT / TPOT of one request alone on the
co-located server (measured first; the Semi-PD paper used 7.5x and 10x). Reported per
deployment and rate: TTFT and TPOT p50 / p99, SLO attainment; the highest rate at which
attainment stays >= 90 %; PSS of the deployment's processes; for Semi-PD the time each split
change took (re-pinning a worker between two of its steps).

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_semi_pd.py --output bench_out/semi_pd.json
    # the Semi-PD deployments only, against the SLOs of an earlier run:
    ... bench_semi_pd.py --deployments semi_pd_fixed,semi_pd_slo --slo-ms 1196,310 --rates 1.5,3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, mixed_bench_cmd, stop_server, stream_times, write_json  # noqa: E402
from bench_pd import _get, start, wait_quiet  # noqa: E402

DEPLOYMENTS = ("colocated", "pd_disjoint", "semi_pd_fixed", "semi_pd_slo")


def deploy(kind: str, a, slo: tuple[float, float]) -> tuple[str, subprocess.Popen]:
    py = [sys.executable, "-m", "pdserve.cli"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--port", str(port), "--dtype", "float32", "--max-total-tokens", str(a.max_total_tokens)]
    pre, dec = (int(x) for x in a.split.split("/"))
    if kind == "colocated":
        return url, start(py + ["serve", *common], url, "/health")
    if kind == "pd_disjoint":
        return url, start(
            py
            + [
                "launch",
                *common,
                "--transfer-backend",
                "shm",
                "--bootstrap-port-base",
                str(free_port()),
                "--cpu-split",
                "disjoint",
            ],
            url,
            "/readiness",
        )
    semi = ["--enable-semi-pd", "--initial-prefill-sm", str(pre), "--initial-decode-sm", str(dec)]
    if kind == "semi_pd_slo":
        semi += [
            "--enable-slo-aware",
            "--slo-ttft-target",
            f"{slo[0]:.1f}",
            "--slo-tpot-target",
            f"{slo[1]:.1f}",
            "--slo-monitoring-interval",
            str(a.slo_interval),
            "--slo-window-size",
            str(3 * a.slo_interval),
        ]
    return url, start(py + ["serve", *common, *semi], url, "/health")


def pss_mib(proc: subprocess.Popen) -> float:
    """Proportional set size of the deployment's process tree (shared memory counted once)."""
    total = 0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total / 2**20


def run_rate(url: str, rate: float, out_file: str, a, slo: tuple[float, float]) -> dict:
    cmd = mixed_bench_cmd(
        url,
        num_prompts=a.num_prompts,
        output_len=48,
        long_input_len=768,
        rate=rate,
        out_file=out_file,
        warmup=1,
        slo_ms=slo,
    )
    subprocess.run(cmd, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    with open(out_file) as f:
        m = json.load(f)
    return {
        "ttft_p50_ms": _get(m, "ttft_ms", "median"),
        "ttft_p99_ms": _get(m, "ttft_ms", "p99"),
        "tpot_p50_ms": _get(m, "tpot_ms", "median"),
        "tpot_p99_ms": _get(m, "tpot_ms", "p99"),
        "attainment": _get(m, "slo_attainment"),
        "goodput": _get(m, "goodput"),
        "failed": _get(m, "failed"),
    }


def unloaded_latency(url: str, n: int = 3) -> tuple[float, float]:
    """Median TTFT and TPOT (ms) of one 128-token prompt / 48-token output, alone."""
    ttfts, tpots = [], []
    for i in range(n):
        ids = [(i * 7919 + j * 31) % 40000 + 100 for j in range(128)]
        ttft, times = stream_times(
            url, {"input_ids": ids, "sampling_params": {"max_new_tokens": 48, "ignore_eos": True, "temperature": 0}}
        )
        ttfts.append(ttft * 1000)
        tpots.append((times[-1] - times[0]) / max(1, len(times) - 1) * 1000)
    return sorted(ttfts)[n // 2], sorted(tpots)[n // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="bench_out/semi_pd.json")
    ap.add_argument("--rates", default="0.25,0.5,1.0,1.5", help="Poisson request rates, comma-separated")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--slo-factor", type=float, default=7.5)
    ap.add_argument("--split", default="50/50", help="Semi-PD's (initial) split, prefill/decode %%")
    ap.add_argument("--slo-interval", type=float, default=5.0, help="SLO controller interval, s")
    ap.add_argument("--max-total-tokens", type=int, default=32768)
    ap.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    ap.add_argument(
        "--slo-ms",
        default="",
        help="TTFT,TPOT targets in ms instead of --slo-factor x unloaded co-located (to compare with an earlier run)",
    )
    a = ap.parse_args()
    rates = [float(r) for r in a.rates.split(",")]
    kinds = [k for k in a.deployments.split(",") if k]
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rates": rates,
        "num_prompts": a.num_prompts,
        "split": a.split,
        "cores": len(os.sched_getaffinity(0)),
        "deployments": {},
    }
    if a.slo_ms:
        slo = tuple(float(v) for v in a.slo_ms.split(","))
        res.update(slo_ttft_ms=slo[0], slo_tpot_ms=slo[1])
    else:  # the SLOs: a multiple of one request alone on the co-located server
        url, proc = deploy("colocated", a, (0, 0))
        try:
            stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
            wait_quiet([proc])
            ttft0, tpot0 = unloaded_latency(url)
        finally:
            stop_server(proc)
        slo = (a.slo_factor * ttft0, a.slo_factor * tpot0)
        res.update(unloaded_ttft_ms=ttft0, unloaded_tpot_ms=tpot0, slo_ttft_ms=slo[0], slo_tpot_ms=slo[1])
        print(f"unloaded: TTFT {ttft0:.1f} ms, TPOT {tpot0:.1f} ms -> SLO TTFT {slo[0]:.0f} ms, TPOT {slo[1]:.0f} ms")
    for kind in kinds:
        url, proc = deploy(kind, a, slo)
        d: dict = {"rates": {}}
        try:
            stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
            wait_quiet([proc])
            d["pss_mib_idle"] = pss_mib(proc)
            for rate in rates:
                d["rates"][str(rate)] = run_rate(url, rate, f"{a.output}.{kind}.{rate}.json", a, slo)
                print(kind, rate, d["rates"][str(rate)], flush=True)
            d["pss_mib_after"] = pss_mib(proc)
            if kind.startswith("semi_pd"):
                st = httpx.get(url + "/semi_pd/status", timeout=30).json()
                d["split_history"] = st["process_rotation_status"]["changes"]
                d["final_split"] = st["current_split"]
                if st.get("slo_controller_status"):
                    d["controller"] = st["slo_controller_status"]["statistics"]
                d["step_timing"] = st["step_timing"]
                d["plan"] = st["process_rotation_status"]["plan"]
                if kind == "semi_pd_fixed":  # time of a split change: re-pin between two steps
                    for pre, dec in ((70, 30), (30, 70), (50, 50), (60, 40), (40, 60)):
                        httpx.post(
                            url + "/semi_pd/reallocate",
                            json={"prefill_percentage": pre, "decode_percentage": dec},
                            timeout=30,
                        )
                        time.sleep(0.3)
                    st = httpx.get(url + "/semi_pd/status", timeout=30).json()
                    d["pin_seconds"] = st["process_rotation_status"]["pin_seconds"]
        finally:
            stop_server(proc)
        ok = [r for r in rates if d["rates"].get(str(r), {}).get("attainment", 0) >= 0.9]
        d["max_rate_90pct"] = max(ok) if ok else 0.0
        res["deployments"][kind] = d
    print(
        f"\nmixed load, {a.num_prompts} requests per rate; SLO TTFT <= {slo[0]:.0f} ms, TPOT <= {slo[1]:.0f} ms "
        f"({a.slo_factor}x unloaded)"
    )
    print(f"{'deployment':<15}{'rate':>6}{'TTFT p50':>10}{'p99':>9}{'TPOT p50':>10}{'p99':>8}{'attain':>8}")
    for kind, d in res["deployments"].items():
        for r, m in d["rates"].items():
            print(
                f"{kind:<15}{float(r):>6.2f}{m['ttft_p50_ms']:>10.0f}{m['ttft_p99_ms']:>9.0f}"
                f"{m['tpot_p50_ms']:>10.0f}{m['tpot_p99_ms']:>8.0f}{m['attainment']:>8.2f}"
            )
        print(
            f"{kind:<15} highest rate with >= 90 % attainment: {d['max_rate_90pct']}; "
            f"PSS {d.get('pss_mib_idle', 0):.0f} MiB idle"
        )
    write_json(a.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
