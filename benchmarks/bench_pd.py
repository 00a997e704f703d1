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

Issue #12 (KV sent per prefill chunk, overlapping the next chunk's forward): long prompts
(`--prompt-lens 256,2048,4096`: 1, 4 and 8 chunks of 512), only the TTFT part (`--skip-mixed`), and the 1P1D
deployments of another checkout (`--baseline-tree /tmp/y`, e.g. a clone of main) run
beside this one's and take turns with them, so before and after are measured in one run:

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/bench_pd.py --skip-mixed \
        --prompt-lens 256,2048,4096 --splits shared --baseline-tree /tmp/y --output bench_out/pd12.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import free_port, mixed_bench_cmd, prompt_ids, stop_server, stream_times, write_json  # noqa: E402

from pdserve.launch.cli import wait_healthy  # noqa: E402


def start(cmd: list[str], url: str, ready_path: str, timeout: float = 300, tree: str | None = None) -> subprocess.Popen:
    """Start a server and wait until it is healthy. `tree`: run the pdserve of that checkout
    (its directory first on the module path) instead of this one's."""
    env = None
    if tree is not None:
        env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree, env=env
    )
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
    ap.add_argument(
        "--prompt-lens",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[256],
        help="tokens of the TTFT prompts, comma-separated (each length measured in every round)",
    )
    ap.add_argument("--splits", default="disjoint,shared", help="1P1D --cpu-split values to deploy")
    ap.add_argument(
        "--baseline-tree",
        default=None,
        help="also deploy the 1P1D deployments from this checkout (e.g. a clone of main), interleaved",
    )
    ap.add_argument("--skip-mixed", action="store_true", help="only the low-load TTFT part")
    ap.add_argument("--max-total-tokens", type=int, default=65536)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--rate", type=float, default=1.0, help="Poisson request rate of the mixed load")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000)
    ap.add_argument("--slo-tpot-ms", type=float, default=100)
    ap.add_argument("--backend", default="tcp", choices=("tcp", "shm"))
    a = ap.parse_args()
    splits = [x for x in a.splits.split(",") if x]
    if not set(splits) <= {"disjoint", "shared"}:
        ap.error(f"--splits takes disjoint and/or shared, got {a.splits!r}")
    if a.baseline_tree is not None and not os.path.isdir(os.path.join(a.baseline_tree, "pdserve")):
        ap.error(f"--baseline-tree {a.baseline_tree!r} holds no pdserve package")
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "loadavg_start": os.getloadavg(),
        "prompt_lens": a.prompt_lens,
        "slo_ttft_ms": a.slo_ttft_ms,
        "slo_tpot_ms": a.slo_tpot_ms,
        "rate": a.rate,
        "num_prompts": a.num_prompts,
        "transfer_backend": a.backend,
        "baseline_tree": a.baseline_tree,
    }
    py = [sys.executable, "-m", "pdserve.cli"]
    # (name, --cpu-split or "colocated", checkout or None for this one)
    deps = [("colocated", "colocated", None)] + [(k, k, None) for k in splits]
    if a.baseline_tree is not None:
        deps += [(f"{k}@baseline", k, a.baseline_tree) for k in splits]
    bar = tqdm(total=1 + a.ttft_samples + (0 if a.skip_mixed else 1 + len(splits)), desc="bench_pd")

    def deploy(kind: str, tree: str | None = None) -> tuple[str, subprocess.Popen]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        mtt = ["--max-total-tokens", str(a.max_total_tokens)]
        if kind == "colocated":  # one server on both cores
            return url, start(py + ["serve", "--port", str(port), *mtt], url, "/health", tree=tree)
        # 1P1D, router in front: cores split (one each) or shared (both may use both)
        return url, start(
            py
            + [
                "launch",
                "--port",
                str(port),
                *mtt,
                "--transfer-backend",
                a.backend,
                "--bootstrap-port-base",
                str(free_port()),
                "--cpu-split",
                kind,
            ],
            url,
            "/readiness",
            tree=tree,
        )

    # 1. TTFT: all deployments up at once (idle ones cost ~nothing), requests interleaved
    # colocated, disjoint, shared, [baselines], colocated, ... so that the VM's drifting speed
    # (2x between runs minutes apart) hits all alike; the PD deployments' order flips every
    # round (no one always runs right after co-located); distinct prompts, no cache hits
    names = [n for n, _, _ in deps]
    lens = a.prompt_lens
    samples: dict[int, dict[str, list[float]]] = {n_tok: {n: [] for n in names} for n_tok in lens}
    procs: list[subprocess.Popen] = []
    k = 0
    try:
        urls = {}
        for name, kind, tree in deps:
            urls[name], proc = deploy(kind, tree)
            procs.append(proc)
            stream_times(urls[name], {"text": "warm up", "sampling_params": {"max_new_tokens": 4}})
            for n_tok in lens:  # the first forward of a new length pays one-off costs
                warm = {"input_ids": prompt_ids(10_000 + k, n_tok), "sampling_params": {"max_new_tokens": 1}}
                k += 1
                stream_times(urls[name], warm)
        res["quiet_wait_s"] = wait_quiet(procs)
        res["loadavg_measure_start"] = os.getloadavg()
        bar.update()
        for i in range(a.ttft_samples):
            order = [names[0], *(names[1:] if i % 2 == 0 else reversed(names[1:]))]
            for n_tok in lens:
                for name in order:
                    body = {"input_ids": prompt_ids(k, n_tok), "sampling_params": {"max_new_tokens": 1}}
                    k += 1
                    samples[n_tok][name].append(stream_times(urls[name], body)[0] * 1000)
            bar.update()
        res["loadavg_measure_end"] = os.getloadavg()
    finally:
        for proc in procs:
            stop_server(proc)
    res["ttft"] = {}
    for n_tok in lens:
        sm = samples[n_tok]
        med = {n: statistics.median(sm[n]) for n in names}
        r: dict = {"samples_ms": sm, "median_ms": med, "overhead_pct": {}, "paired_overhead_pct": {}}
        for name in names[1:]:
            r["overhead_pct"][name] = 100 * (med[name] / med["colocated"] - 1)
            # each PD sample against the co-located one of the same round (same VM speed)
            r["paired_overhead_pct"][name] = 100 * (
                statistics.median(p / c for p, c in zip(sm[name], sm["colocated"])) - 1
            )
        res["ttft"][str(n_tok)] = r
        if n_tok == 256:  # the keys of the earlier runs
            res["colocated_ttft_256_ms"] = med["colocated"]
            for sp in splits:
                res[f"pd_{sp}_ttft_256_ms"] = med[sp]
                res[f"pd_{sp}_ttft_overhead_pct"] = r["overhead_pct"][sp]
                res[f"pd_{sp}_ttft_paired_overhead_pct"] = r["paired_overhead_pct"][sp]
        print(
            "\nTTFT of a %d-token prompt, low load (median of %d): co-located %.1f ms"
            % (n_tok, a.ttft_samples, med["colocated"])
        )
        for name in names[1:]:
            o, po = r["overhead_pct"][name], r["paired_overhead_pct"][name]
            verdict = "met" if max(o, po) <= 10 else "MISSED"
            print(
                f"  1P1D --cpu-split {name:<18}: {med[name]:.1f} ms, PD overhead {o:+.1f} % of medians, "
                f"{po:+.1f} % median of paired ratios (target <= 10 %: {verdict})"
            )
    print(
        "load average: start %s, measuring %s -> %s"
        % (res["loadavg_start"], res["loadavg_measure_start"], res["loadavg_measure_end"])
    )
    if a.skip_mixed:
        bar.close()
        write_json(a.output, res)
        return 0
    # 2. mixed load, one deployment at a time
    mixed = ["colocated", *splits]
    for k in mixed:
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
    keys = [("ttft_ms", "median"), ("ttft_ms", "p99"), ("tpot_ms", "median"), ("tpot_ms", "p99")]
    print(
        f"\nmixed load, Poisson {a.rate}/s, {a.num_prompts} requests, SLO TTFT<={a.slo_ttft_ms} ms, "
        f"TPOT<={a.slo_tpot_ms} ms"
    )
    print(f"{'':<12}" + "".join(f"{k}.{s:<8}" for k, s in keys) + "goodput  attainment  failed")
    for name in ["colocated", *(f"pd_{k}" for k in splits)]:
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
