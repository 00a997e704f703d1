"""Where Semi-PD's time goes on this machine (issue #13): one server at a time, one request
at a time (no queueing), so what is measured is the cost of a step, not of a load.

For each configuration: start it, warm up, then
  - unloaded TTFT and TPOT of a 128-token prompt / 48-token output (median of --reps), and
    of a 768-token prompt (the mixed workload's long one);
  - for Semi-PD, the resident's per-step timing (/semi_pd/status `step_timing`): the worker's
    forward alone against the whole step as the resident sees it (batch building, the
    batch and logits crossing the sockets, sampling), median per role.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/probe_semi_pd.py \
        --configs colocated,semi:50/50,semi:70/30 --output bench_out/probe_semi_pd.json

A configuration is `colocated` (mode null) or `semi:P/D[:item,...]`: Semi-PD at split P/D;
an item `--flag=value` is an extra `pdserve serve` flag, `NAME=value` an environment variable
of the server's processes (e.g. `semi:70/30:PDSERVE_SEMI_PD_CFS_PERIOD_US=10000`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, stop_server, stream_times, write_json  # noqa: E402
from bench_pd import start, wait_quiet  # noqa: E402


def server_cmd(config: str, port: int, max_total_tokens: int) -> tuple[list[str], dict[str, str]]:
    """The command line and the extra environment of a configuration."""
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), "--dtype", "float32"]
    cmd += ["--max-total-tokens", str(max_total_tokens)]
    env: dict[str, str] = {}
    if config == "colocated":
        return cmd, env
    kind, _, rest = config.partition(":")
    if kind != "semi":
        raise SystemExit(f"unknown configuration {config!r}: colocated or semi:P/D[:flags]")
    split, _, extra = rest.partition(":")
    pre, dec = split.split("/")
    cmd += ["--enable-semi-pd", "--initial-prefill-sm", pre, "--initial-decode-sm", dec]
    for item in filter(None, extra.split(",")):
        name, eq, value = item.partition("=")
        if name.startswith("--"):
            cmd += [name, value] if eq else [name]
        else:
            env[name] = value
    return cmd, env


def latency(url: str, prompt_len: int, reps: int) -> tuple[float, float, float]:
    """Median TTFT and TPOT (ms) of one request alone, and the p99 of its inter-token gaps
    over all reps (where a CFS quota's throttling shows: a step stalled until the next period)."""
    ttfts, tpots, gaps = [], [], []
    for i in range(reps):
        ids = [(i * 7919 + j * 31) % 40000 + 100 for j in range(prompt_len)]
        ttft, times = stream_times(
            url, {"input_ids": ids, "sampling_params": {"max_new_tokens": 48, "ignore_eos": True, "temperature": 0}}
        )
        ttfts.append(ttft * 1000)
        tpots.append((times[-1] - times[0]) / max(1, len(times) - 1) * 1000)
        gaps += [(b - a) * 1000 for a, b in zip(times, times[1:])]
    gaps.sort()
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else float("nan")
    return sorted(ttfts)[reps // 2], sorted(tpots)[reps // 2], p99


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="colocated,semi:50/50,semi:70/30")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-total-tokens", type=int, default=32768)
    ap.add_argument("--output", default="bench_out/probe_semi_pd.json")
    a = ap.parse_args()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": len(os.sched_getaffinity(0)), "configs": {}}
    for config in a.configs.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd, env = server_cmd(config, port, a.max_total_tokens)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the server's processes inherit it
        try:
            proc = start(cmd, url, "/health")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            stream_times(url, {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
            wait_quiet([proc])
            r: dict = {}
            r["ttft_128_ms"], r["tpot_128_ms"], r["itl_p99_128_ms"] = latency(url, 128, a.reps)
            r["ttft_768_ms"], r["tpot_768_ms"], r["itl_p99_768_ms"] = latency(url, 768, a.reps)
            if config != "colocated":
                st = httpx.get(url + "/semi_pd/status", timeout=30).json()
                r["step_timing"] = st["step_timing"]
                r["plan"] = st["process_rotation_status"]["plan"]
                r["cpu_share"] = st["process_rotation_status"]["cpu_share"]
        finally:
            stop_server(proc)
        res["configs"][config] = r
        print(config, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    print(
        f"\n{'config':<40}{'TTFT128':>9}{'TPOT128':>9}{'TTFT768':>9}{'TPOT768':>9}{'ITLp99':>8}  step fwd/wall ms (p50)"
    )
    for config, r in res["configs"].items():
        steps = " ".join(
            f"{role} {t['forward_ms_p50']:.1f}/{t['wall_ms_p50']:.1f}" for role, t in r.get("step_timing", {}).items()
        )
        print(
            f"{config:<40}{r['ttft_128_ms']:>9.1f}{r['tpot_128_ms']:>9.1f}{r['ttft_768_ms']:>9.1f}"
            f"{r['tpot_768_ms']:>9.1f}{r['itl_p99_128_ms']:>8.1f}  {steps}"
        )
    write_json(a.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
