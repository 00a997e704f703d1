"""PD figures of issue #3, measured in one run on this machine (2 cores):

1. TTFT of a 256-token prompt at low load (one request at a time), co-located
   `pdserve serve` (both cores) vs 1P1D `pdserve launch`, with the cores split (one
   each: prefill computes on half the machine) and shared (both servers may use both
   cores: the same compute as co-located, so the difference is the PD overhead proper).
   The three run side by side and take turns, request by request (this VM's speed drifts
   by up to 2x over minutes; back-to-back phases measured the drift, not PD).
2. A mixed load (long prompts arriving while many requests decode), Poisson arrivals,
   through `pdserve bench`: TTFT / TPOT p50 / p99 and goodput at the stated SLO.

    .venv/bin/python benchmarks/bench_pd.py --output bench_out/pd.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, mixed_bench_cmd, prompt_ids, stop_server, stream_times, write_json  # noqa: E402

from pdserve.launch.cli import wait_healthy  # noqa: E402


def start(cmd: list[str], url: str, ready_path: str, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc, time.time() + timeout, ready_path)
    except RuntimeError:
        stop_server(proc)
        raise
    return proc


def wait_quiet(procs: list[subprocess.Popen], limit_s: float = 90.0) -> float:
    """Wait until the deployments' process trees use < 0.1 core over a second (servers
    populate their KV pools in the background after startup, docs/architecture.md); returns
    the seconds waited. Measures steady-state serving, not the first seconds after a start."""
    import psutil

    t0 = time.time()
    while time.time() - t0 < limit_s:
        tree = []
        for p in procs:
            try:
                root = psutil.Process(p.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass

        def cpu() -> float:
            total = 0.0
            for q in tree:
                try:
                    total += sum(q.cpu_times()[:2])
                except psutil.Error:
                    pass
            return total

        a = cpu()
        time.sleep(1.0)
        if cpu() - a < 0.1:
            break
    return time.time() - t0


def mixed_load(url: str, out_file: str, a) -> dict:
    cmd = mixed_bench_cmd(
        url,
        num_prompts=a.num_prompts,
        output_len=64,
        long_input_len=1024,
        rate=a.rate,
        out_file=out_file,
        warmup=2,
        slo_ms=(a.slo_ttft_ms, a.slo_tpot_ms),
    )
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
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "slo_ttft_ms": a.slo_ttft_ms,
        "slo_tpot_ms": a.slo_tpot_ms,
        "rate": a.rate,
        "num_prompts": a.num_prompts,
        "transfer_backend": a.backend,
    }
    py = [sys.executable, "-m", "pdserve.cli"]
    bar = tqdm(total=1 + a.ttft_samples + 3, desc="bench_pd")

    def deploy(kind: str) -> tuple[str, subprocess.Popen]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if kind == "colocated":  # one server on both cores
            return url, start(py + ["serve", "--port", str(port), "--max-total-tokens", "65536"], url, "/health")
        # 1P1D, router in front: cores split (one each) or shared (both may use both)
        return url, start(
            py
            + [
                "launch",
                "--port",
                str(port),
                "--max-total-tokens",
                "65536",
                "--transfer-backend",
                a.backend,
                "--bootstrap-port-base",
                str(free_port()),
                "--cpu-split",
                kind,
            ],
            url,
            "/readiness",
        )

    kinds = ("colocated", "disjoint", "shared")
    # 1. TTFT: all three deployments up at once (idle ones cost ~nothing), requests
    # interleaved colocated, disjoint, shared, colocated, ... so that the VM's drifting speed
    # (2x between runs minutes apart) hits all three alike; distinct prompts, no cache hits
    procs: list[subprocess.Popen] = []
    try:
        urls = {}
        for k in kinds:
            urls[k], proc = deploy(k)
            procs.append(proc)
            stream_times(urls[k], {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
        res["quiet_wait_s"] = wait_quiet(procs)
        bar.update()
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(a.ttft_samples):
            for j, k in enumerate(kinds):
                ids = prompt_ids(i * 3 + j)
                samples[k].append(
                    stream_times(urls[k], {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})[0]
                )
            bar.update()
    finally:
        for proc in procs:
            stop_server(proc)
    res["ttft_256_samples_ms"] = {k: [v * 1000 for v in samples[k]] for k in kinds}
    res["colocated_ttft_256_ms"] = sorted(samples["colocated"])[a.ttft_samples // 2] * 1000
    for split in ("disjoint", "shared"):
        res[f"pd_{split}_ttft_256_ms"] = sorted(samples[split])[a.ttft_samples // 2] * 1000
    # 2. mixed load, one deployment at a time
    for k in kinds:
        url, proc = deploy(k)
        try:
            stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
            wait_quiet([proc])
            name = "colocated" if k == "colocated" else f"pd_{k}"
            res[f"{name}_mixed"] = mixed_load(url, f"{a.output}.{name}.json", a)
        finally:
            stop_server(proc)
        bar.update()
    bar.close()
    print(
        "\nTTFT of a 256-token prompt, low load (median of %d): co-located %.1f ms"
        % (a.ttft_samples, res["colocated_ttft_256_ms"])
    )
    for split in ("disjoint", "shared"):
        res[f"pd_{split}_ttft_overhead_pct"] = 100 * (res[f"pd_{split}_ttft_256_ms"] / res["colocated_ttft_256_ms"] - 1)
        # each PD sample against the co-located one taken just before it (same VM speed)
        ratios = sorted(p / c for p, c in zip(samples[split], samples["colocated"]))
        res[f"pd_{split}_ttft_paired_overhead_pct"] = 100 * (ratios[len(ratios) // 2] - 1)
        print(
            f"  1P1D --cpu-split {split:<8}: {res[f'pd_{split}_ttft_256_ms']:.1f} ms, "
            f"PD overhead {res[f'pd_{split}_ttft_overhead_pct']:+.1f} % of medians, "
            f"{res[f'pd_{split}_ttft_paired_overhead_pct']:+.1f} % median of paired ratios (target <= 10 %)"
        )
    keys = [("ttft_ms", "median"), ("ttft_ms", "p99"), ("tpot_ms", "median"), ("tpot_ms", "p99")]
    print(
        f"\nmixed load, Poisson {a.rate}/s, {a.num_prompts} requests, SLO TTFT<={a.slo_ttft_ms} ms, "
        f"TPOT<={a.slo_tpot_ms} ms"
    )
    print(f"{'':<12}" + "".join(f"{k}.{s:<8}" for k, s in keys) + "goodput  attainment  failed")
    for name in ("colocated", "pd_disjoint", "pd_shared"):
        m = res[f"{name}_mixed"]
        row = f"{name:<12}"
        for k, s in keys:
            row += f"{_get(m, k, s):>15.1f}"
        row += f"{_get(m, 'goodput'):>9.2f}{_get(m, 'slo_attainment'):>12.2f}{_get(m, 'failed'):>8.0f}"
        print(row)
    write_json(a.output, res)
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
