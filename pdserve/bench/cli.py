"""`pdserve bench`: measure any pdserve, SGLang or OpenAI-compatible server.

    pdserve bench --backend pdserve --base-url http://127.0.0.1:30000 \\
        --dataset-name random --random-input-len 256 --random-output-len 128 \\
        --random-range-ratio 1 --num-prompts 64 --request-rate inf
    pdserve bench compare bench_out/a.json bench_out/b.json

A client only: it imports no torch and no engine code (the served model's tokenizer
is loaded through `pdserve.model.tokenizer` to count tokens). Exit status: 0 when
at least one request completed, 1 when the target is unreachable, the warm-up or
every request failed, or the workload cannot be built; 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from typing import Any

from pdserve.bench import datasets as ds
from pdserve.bench.arrivals import parse_rate_range, parse_rates
from pdserve.bench.backends import BACKENDS, uses_openai_api
from pdserve.bench.metrics import Slo
from pdserve.bench.probe import ServerInfo, UnreachableError, probe_server
from pdserve.bench.runner import RunConfig, RunResult, WarmupError, run_benchmark


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdserve bench",
        description="Serving benchmark client (flags as in SGLang's bench_serving). "
        "`pdserve bench compare A.json B.json ...` prints results side by side.",
    )
    t = p.add_argument_group("target")
    t.add_argument(
        "--backend",
        default="pdserve",
        choices=list(BACKENDS),
        help="API to use: pdserve/sglang = /generate; *-oai, vllm, openai = /v1/completions; "
        "*-chat = /v1/chat/completions (default: %(default)s)",
    )
    t.add_argument("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    t.add_argument("--host", default="127.0.0.1", help="server host when no --base-url (default: %(default)s)")
    t.add_argument("--port", type=int, default=30000, help="server port when no --base-url (default: %(default)s)")
    t.add_argument("--model", default=None, help="`model` for OpenAI APIs (default: the first of GET /v1/models)")
    t.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to count tokens with: a GGUF file or HF directory (default: the served "
        "model's, when the server reports a local path, else pdserve's default model)",
    )

    d = p.add_argument_group("workload")
    d.add_argument(
        "--dataset-name",
        default="random",
        choices=list(ds.DATASET_NAMES) + list(ds.DATASET_ALIASES),
        help="workload (generated-shared-prefix = shared-prefix) (default: %(default)s)",
    )
    d.add_argument("--dataset-path", default=None, help="JSONL file for --dataset-name jsonl")
    d.add_argument(
        "--num-prompts",
        type=int,
        default=1000,
        help="requests per run; not for shared-prefix. The defaults (1000 x 1024/1024 tokens, as "
        "SGLang's) are GPU-sized: hours on a CPU, try 32 x 256/64 first (default: %(default)s)",
    )
    d.add_argument("--random-input-len", type=int, default=1024, help="input tokens (default: %(default)s)")
    d.add_argument("--random-output-len", type=int, default=1024, help="output tokens (default: %(default)s)")
    d.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths drawn uniformly from [len * ratio, len]; 1 = fixed (default: %(default)s)",
    )
    d.add_argument("--gsp-num-groups", type=int, default=64, help="shared-prefix: groups (default: %(default)s)")
    d.add_argument(
        "--gsp-prompts-per-group", type=int, default=16, help="shared-prefix: prompts per group (default: %(default)s)"
    )
    d.add_argument(
        "--gsp-system-prompt-len", type=int, default=2048, help="shared-prefix: prefix tokens (default: %(default)s)"
    )
    d.add_argument(
        "--gsp-question-len",
        type=int,
        default=128,
        help="shared-prefix: tokens after the prefix (default: %(default)s)",
    )
    d.add_argument(
        "--gsp-output-len", type=int, default=256, help="shared-prefix: output tokens (default: %(default)s)"
    )
    d.add_argument(
        "--mixed-long-input-len",
        type=int,
        default=2048,
        help="mixed: input tokens of a long prompt (default: %(default)s)",
    )
    d.add_argument(
        "--mixed-long-fraction",
        type=float,
        default=0.1,
        help="mixed: share of long prompts; short ones use --random-* (default: %(default)s)",
    )
    d.add_argument(
        "--jsonl-output-len",
        type=int,
        default=256,
        help="jsonl: output tokens when a line gives none (default: %(default)s)",
    )
    d.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    d.add_argument(
        "--extra-request-body", default=None, metavar="JSON", help="JSON object merged into every request body"
    )

    a = p.add_argument_group("arrivals")
    a.add_argument(
        "--request-rate",
        default="inf",
        help="requests/s: inf = all at once; a comma list (1,2,4) is a sweep (default: %(default)s)",
    )
    a.add_argument(
        "--request-rate-range",
        default=None,
        metavar="START,STOP,STEP",
        help="sweep these rates (replaces --request-rate)",
    )
    a.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 more even (default: %(default)s)",
    )
    a.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    a.add_argument("--seed", type=int, default=1, help="seed of prompts and arrivals (default: %(default)s)")
    a.add_argument(
        "--warmup-requests", type=int, default=1, help="sent first, excluded from the figures (default: %(default)s)"
    )
    a.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before each run")
    a.add_argument(
        "--profile",
        action="store_true",
        help="POST /start_profile before each run and /stop_profile after it (SGLang's flag): each "
        "server, or through a router each prefill and decode server, writes a torch.profiler "
        "trace named by role into its $SGLANG_TORCH_PROFILER_DIR (default /tmp)",
    )

    s = p.add_argument_group("SLOs and timeouts")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT objective for goodput")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT objective for goodput")
    s.add_argument(
        "--request-timeout", type=float, default=1800.0, help="seconds a whole request may take (default: %(default)s)"
    )
    s.add_argument(
        "--read-timeout",
        type=float,
        default=300.0,
        help="seconds of silence before a request fails (default: %(default)s)",
    )
    s.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to connect (default: %(default)s)")

    o = p.add_argument_group("output")
    o.add_argument(
        "--output-dir", default="bench_out", help="where the JSON result and PNG plots go (default: %(default)s)"
    )
    o.add_argument(
        "--output-file", default=None, help="JSON result path (default: OUTPUT_DIR/<backend>_<dataset>_<time>.json)"
    )
    o.add_argument("--no-plots", action="store_true", help="write no PNG")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return p


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses and checks the flags; errors name the flag and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.dataset_name = ds.DATASET_ALIASES.get(args.dataset_name, args.dataset_name)
    try:
        args.rates = (
            parse_rate_range(args.request_rate_range) if args.request_rate_range else parse_rates(args.request_rate)
        )
    except ValueError as e:
        flag = "--request-rate-range" if args.request_rate_range else "--request-rate"
        parser.error(f"{flag}: {e}")
    _positive(
        parser,
        args,
        "num_prompts",
        "random_input_len",
        "random_output_len",
        "burstiness",
        "max_concurrency",
        "slo_ttft_ms",
        "slo_tpot_ms",
        "request_timeout",
        "read_timeout",
        "connect_timeout",
        "jsonl_output_len",
        "mixed_long_input_len",
        "gsp_num_groups",
        "gsp_prompts_per_group",
        "gsp_system_prompt_len",
        "gsp_question_len",
        "gsp_output_len",
    )
    if not 0.0 <= args.random_range_ratio <= 1.0:
        parser.error(f"--random-range-ratio must be in [0, 1], got {args.random_range_ratio}")
    if not 0.0 <= args.mixed_long_fraction <= 1.0:
        parser.error(f"--mixed-long-fraction must be in [0, 1], got {args.mixed_long_fraction}")
    if args.warmup_requests < 0:
        parser.error(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    if args.dataset_name == "jsonl" and not args.dataset_path:
        parser.error("--dataset-path is required with --dataset-name jsonl")
    if args.extra_request_body:
        try:
            args.extra_body = json.loads(args.extra_request_body)
        except json.JSONDecodeError as e:
            parser.error(f"--extra-request-body is not JSON: {e}")
        if not isinstance(args.extra_body, dict):
            parser.error("--extra-request-body must be a JSON object")
    else:
        args.extra_body = {}
    url = args.base_url or f"http://{args.host}:{args.port}"
    if not url.startswith(("http://", "https://")):
        parser.error(f"--base-url must start with http:// or https://, got {url!r}")
    url = url.rstrip("/")
    args.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
    return args


def _local_path(path: str | None) -> str | None:
    return path if path and os.path.exists(path) else None


def resolve_tokenizer(args: argparse.Namespace, info: ServerInfo):
    """The tokenizer to count tokens with, and where it came from."""
    from pdserve.model.tokenizer import load_tokenizer  # lazy: transformers is slow to import

    source = args.tokenizer or _local_path(args.model) or _local_path(info.model_path)
    if source is None:
        source = next((m for m in info.models if _local_path(m)), None)
    return load_tokenizer(tokenizer_path=source), source or "default model"


def build_requests(args: argparse.Namespace, tokenizer) -> list[ds.BenchRequest]:
    """The workload the flags describe."""
    rnd = ds.RandomSpec(args.random_input_len, args.random_output_len, args.random_range_ratio)
    if args.dataset_name == "random":
        return ds.random_requests(tokenizer, args.num_prompts, rnd, args.seed)
    if args.dataset_name == "shared-prefix":
        spec = ds.SharedPrefixSpec(
            args.gsp_num_groups,
            args.gsp_prompts_per_group,
            args.gsp_system_prompt_len,
            args.gsp_question_len,
            args.gsp_output_len,
        )
        return ds.shared_prefix_requests(tokenizer, spec, args.seed)
    if args.dataset_name == "mixed":
        spec = ds.MixedSpec(rnd, args.mixed_long_input_len, args.mixed_long_fraction)
        return ds.mixed_requests(tokenizer, args.num_prompts, spec, args.seed)
    return ds.jsonl_requests(tokenizer, args.dataset_path, args.num_prompts, args.jsonl_output_len)


def run_config(args: argparse.Namespace, model: str | None) -> RunConfig:
    return RunConfig(
        base_url=args.base_url,
        backend=args.backend,
        model=model,
        request_rates=tuple(args.rates),
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        warmup_requests=args.warmup_requests,
        ignore_eos=not args.disable_ignore_eos,
        extra_body=args.extra_body,
        request_timeout_s=args.request_timeout,
        read_timeout_s=args.read_timeout,
        connect_timeout_s=args.connect_timeout,
        flush_cache=args.flush_cache,
        profile=args.profile,
        disable_tqdm=args.disable_tqdm,
        slo=Slo(args.slo_ttft_ms, args.slo_tpot_ms),
    )


def write_outputs(
    args: argparse.Namespace, results: list[RunResult], config: dict[str, Any], server: dict[str, Any]
) -> list[str]:
    """JSON result plus plots; returns the paths written."""
    from pdserve.bench import report

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.output_file or os.path.join(args.output_dir, f"{args.backend}_{args.dataset_name}_{stamp}.json")
    written = [report.write_json(report.result_dict(results, config, server), json_path)]
    if not args.no_plots:
        stem = os.path.splitext(json_path)[0]
        title = f"{args.backend} {args.dataset_name} @ {args.base_url}"
        written.append(report.plot_latency_cdfs(results, stem + "_cdf.png", title))
        sweep = report.plot_sweep(results, stem + "_sweep.png", title)
        if sweep:
            written.append(sweep)
    return written


def _err(msg: str) -> None:
    print(f"pdserve bench: error: {msg}", file=sys.stderr)


# Output tokens above which a run is hours long on a CPU server (135M model, 2-16 cores:
# roughly 50-1000 output tokens/s in total, see docs/benchmarks.md).
LONG_RUN_OUTPUT_TOKENS = 100_000


def warn_if_long(requests: list[ds.BenchRequest]) -> bool:
    """The defaults are SGLang's (1000 prompts x 1024/1024 tokens), sized for GPUs: say so."""
    out = sum(r.output_len for r in requests)
    if out <= LONG_RUN_OUTPUT_TOKENS:
        return False
    prompt = sum(r.prompt_len for r in requests)
    print(
        f"pdserve bench: warning: this workload asks for {out:,} output tokens ({len(requests)} requests, "
        f"{prompt:,} prompt tokens); a CPU server takes hours for that. For a first run try "
        f"--num-prompts 32 --random-input-len 256 --random-output-len 64",
        file=sys.stderr,
        flush=True,
    )
    return True


def main(argv: list[str]) -> int:
    """Entry point of `pdserve bench ...`; returns the exit status."""
    if argv and argv[0] == "compare":
        from pdserve.bench.compare import main as compare_main

        return compare_main(argv[1:])
    args = parse_args(argv)
    try:
        info = asyncio.run(probe_server(args.base_url, timeout_s=max(args.connect_timeout, 5.0)))
    except UnreachableError as e:
        _err(f"{e} (is the server running?)")
        return 1
    model = args.model
    if uses_openai_api(args.backend) and model is None:
        if not info.models:
            _err(f"{args.base_url}/v1/models lists no model; pass --model")
            return 1
        model = info.models[0]
    t0 = time.perf_counter()
    try:
        tokenizer, tok_source = resolve_tokenizer(args, info)
        requests = build_requests(args, tokenizer)
    except (OSError, ValueError) as e:
        _err(str(e))
        return 1
    print(
        f"pdserve bench: {len(requests)} requests ({args.dataset_name}), tokenizer: {tok_source} "
        f"({time.perf_counter() - t0:.1f} s); target {args.base_url} ({args.backend})",
        file=sys.stderr,
    )
    warn_if_long(requests)
    cfg = run_config(args, model)
    count = lambda text: ds.count_tokens(tokenizer, text)  # noqa: E731
    try:
        results = asyncio.run(run_benchmark(cfg, requests, count))
    except WarmupError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted; no result written")
        return 130

    from pdserve.bench import report

    for r in results:
        header = {
            "Backend": args.backend,
            "Dataset": args.dataset_name,
            "Traffic request rate": report.rate_label(r.request_rate),
            "Burstiness": f"{args.burstiness:g}",
            "Max request concurrency": args.max_concurrency or "not set",
        }
        print(report.summary_table(r.metrics, header))
    config = {k: v for k, v in vars(args).items() if k != "rates"}
    config.update(
        model=model,
        tokenizer_source=tok_source,
        request_rates=[report.rate_label(x) for x in args.rates],
        command="pdserve bench " + shlex.join(argv),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    server = {"model_info": info.model_info, "models": info.models}
    for path in write_outputs(args, results, config, server):
        print(f"wrote {path}", file=sys.stderr)
    if not any(r.metrics.completed for r in results):
        _err("no request completed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
