"""`pdserve serve`: one server (HTTP front end + scheduler process)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket

from pdserve.config import ATTENTION_BACKENDS, DTYPES, LOG_LEVELS, QUANTIZATIONS, ServerArgs
from pdserve.enums import DisaggregationMode

D = ServerArgs  # defaults come from the frozen dataclass


def build_parser() -> argparse.ArgumentParser:
    from pdserve.cli import Parser
    from pdserve.disagg.transfer.registry import TransferBackend

    p = Parser(
        prog="pdserve serve",
        description="Serve one model over HTTP (SGLang-compatible flags). "
        "Start-up errors exit with status 2 and one line; --debug shows the traceback.",
    )
    a = p.add_argument
    a(
        "--model-path",
        default=D.model_path,
        help="a local Hugging Face model directory (config.json, *.safetensors, tokenizer files) or a .gguf "
        "file; Hub names are not downloaded. Default: the packaged SmolLM2-135M-Instruct GGUF",
    )
    a("--tokenizer-path", default=D.tokenizer_path, help="tokenizer directory or .gguf (default: --model-path)")
    a(
        "--chat-template",
        default=D.chat_template,
        help="chat template for /v1/chat/completions: a Jinja file or the template text (default: the model's)",
    )
    a(
        "--tool-call-parser",
        default=D.tool_call_parser,
        help="tool-call format of the model for `tools` in chat requests: hermes (= qwen25, qwen3; Qwen2/2.5/3 "
        "and Hermes models). Default: from the model architecture (Qwen2/Qwen3), else tools are refused",
    )
    a(
        "--trust-remote-code",
        action="store_true",
        help="accepted for SGLang compatibility; pdserve never runs code shipped with a model",
    )
    a("--device", default="cpu", help="device to run on; this build runs on cpu only")
    a("--host", default=D.host, help="address to bind (use 0.0.0.0 only behind a firewall)")
    a("--port", type=int, default=D.port, help="HTTP port")
    a("--dtype", default=D.dtype, choices=DTYPES, help="weight and activation dtype (auto: bfloat16 on CPU)")
    a(
        "--mem-fraction-static",
        type=float,
        default=D.mem_fraction_static,
        help="share of RAM for weights + KV pool (None: 0.1 on CPU)",
    )
    a(
        "--max-total-tokens",
        type=int,
        default=D.max_total_tokens,
        help="KV pool size in tokens (wins over --mem-fraction-static)",
    )
    a("--max-running-requests", type=int, default=D.max_running_requests, help="requests decoded together")
    a(
        "--chunked-prefill-size",
        type=int,
        default=D.chunked_prefill_size,
        help="longest prefill chunk in tokens (long prompts are prefilled in chunks)",
    )
    a("--page-size", type=int, default=D.page_size, help="tokens per KV page")
    a(
        "--context-length",
        type=int,
        default=D.context_length,
        help="longest prompt + output in tokens (None: the model's)",
    )
    a("--disable-radix-cache", action="store_true", help="no prefix caching between requests")
    a(
        "--disable-overlap-schedule",
        dest="disable_overlap_schedule",
        action="store_true",
        default=D.disable_overlap_schedule,
        help="the normal event loop (measured faster on CPU)",
    )
    a(
        "--enable-overlap-schedule",
        dest="disable_overlap_schedule",
        action="store_false",
        help="the overlap event loop (outputs sent while the next forward runs)",
    )
    a(
        "--served-model-name",
        default=D.served_model_name,
        help="the model name clients send and /v1/models lists (None: the file or directory name)",
    )
    a("--log-level", default=D.log_level, choices=LOG_LEVELS, help="logging level")
    a("--debug", action="store_true", help="show tracebacks of start-up errors")
    a("--random-seed", type=int, default=D.random_seed, help="seed of the sampler")
    a("--num-threads", type=int, default=D.num_threads, help="torch threads in the scheduler (None: all cores)")
    a(
        "--w4-decode-max-tokens",
        type=int,
        default=D.w4_decode_max_tokens,
        help="steps of at most this many tokens multiply by 4-bit weights: in float32 the GGUF's own grid, "
        "exact (pdserve's kernel, AVX-512 or AVX2+FMA+F16C); in bf16 torch's int4 matmul on a re-quantized "
        "copy; with --quantization w8a8_int8 such steps take the 4-bit copies and larger ones int8; 0 = off",
    )
    a(
        "--quantization",
        default=D.quantization,
        choices=QUANTIZATIONS,
        help="w8a8_int8: the decoder layers' linears in int8 (weights per output channel, activations per "
        "row at run time); 2-4x faster linears on CPUs with AVX512-VNNI, greedy output close to but not "
        "equal to the model dtype's (docs/benchmarks.md, agreement)",
    )
    a(
        "--disaggregation-mode",
        default=D.disaggregation_mode,
        choices=("null", "prefill", "decode"),
        help="null: a whole server; prefill/decode: one half of a PD pair, behind `pdserve router`",
    )
    a(
        "--disaggregation-bootstrap-port",
        type=int,
        default=D.disaggregation_bootstrap_port,
        help="prefill: port of the bootstrap server decode servers connect to",
    )
    a(
        "--disaggregation-transfer-backend",
        "--transfer-backend",
        dest="disaggregation_transfer_backend",
        default=D.disaggregation_transfer_backend,
        choices=[b.value for b in TransferBackend],
        help="how KV moves from prefill to decode: tcp (any hosts), shm (same host), gloo, nixl / mooncake (their "
        "engines, optional extras pdserve[nixl] / pdserve[mooncake]), fake (moves nothing)",
    )
    a(
        "--disaggregation-ib-device",
        default=D.disaggregation_ib_device,
        help="RDMA devices for the mooncake backend (e.g. mlx5_0,mlx5_1); unset: its TCP transport. "
        "nixl picks its transports itself (UCX)",
    )
    a(
        "--attention-backend",
        default=D.attention_backend,
        choices=ATTENTION_BACKENDS,
        help="paged attention implementation (pdserve/model/attention_backends.py): auto = cpu_paged (C++ "
        "decode kernel reading the paged KV in place; compiled once per machine) where it builds, else "
        "torch_native (portable PyTorch, also on GPUs)",
    )
    a(
        "--tp-size",
        type=int,
        default=D.tp_size,
        help="tensor-parallel ranks (at most the model's KV heads; they split the cores)",
    )
    a(
        "--kv-store",
        "--hicache-storage-backend",
        dest="kv_store",
        default=D.kv_store,
        metavar="URL",
        help="KV cache data service shared by servers (docs/kvstore.md): http://HOST:PORT (`pdserve kvstore`), "
        "mooncake://MASTER_HOST:PORT (Mooncake Store) or memory:// (in-process). Before a prefill the longest "
        "stored prefix is fetched instead of computed; after it, new full pages are written. Mode null and "
        "prefill servers use it (decode servers ignore it)",
    )
    a(
        "--kv-store-timeout",
        type=float,
        default=D.kv_store_timeout,
        help="seconds a request's store lookup may hold back its prefill; then it computes the prefix itself",
    )
    a(
        "--api-key",
        default=D.api_key,
        help="clients must send 'Authorization: Bearer KEY' (every path but /health, /health_generate)",
    )
    a(
        "--admin-api-key",
        default=D.admin_api_key,
        help="admin paths (/flush_cache, /abort_request) need this key instead of --api-key",
    )
    a(
        "--max-payload-size",
        type=int,
        default=D.max_payload_size,
        help="largest request body in bytes; larger ones get 413 before they are read",
    )
    add_semi_pd_flags(p)
    return p


def add_semi_pd_flags(p: argparse.ArgumentParser) -> None:
    """The seed's Semi-PD flags (docs/semi_pd.md). Validated in ServerArgs; settings the server
    cannot honour are refused before anything starts (preflight.check_semi_pd)."""
    g = p.add_argument_group("Semi-PD (docs/semi_pd.md)")
    a = g.add_argument
    a("--enable-semi-pd", action="store_true", help="prefill and decode workers with a fixed compute split")
    a(
        "--enable-semi-pd-coordinator",
        action="store_true",
        help="Semi-PD with all parts: split, unified KV pool, SLO-aware controller (as --enable-semi-pd "
        "--enable-slo-aware)",
    )
    a(
        "--enable-unified-memory",
        action="store_true",
        help="Semi-PD (its KV pool is always the one unified pool of both workers)",
    )
    a("--enable-slo-aware", action="store_true", help="Semi-PD with the SLO-aware split controller")
    a(
        "--unified-memory-blocks",
        type=int,
        default=D.unified_memory_blocks,
        help="blocks of pdserve.semi_pd.UnifiedMemoryManager; the server's pool is sized by --max-total-tokens "
        "(non-default values are refused)",
    )
    a(
        "--unified-memory-block-size",
        type=int,
        default=D.unified_memory_block_size,
        help="bytes per block (K and V of --unified-memory-page-size tokens of one layer)",
    )
    a("--unified-memory-page-size", type=int, default=D.unified_memory_page_size, help="tokens per block")
    a("--slo-ttft-target", type=float, default=D.slo_ttft_target, help="TTFT target in ms (p95)")
    a("--slo-tpot-target", type=float, default=D.slo_tpot_target, help="TPOT target in ms (p95)")
    a("--slo-window-size", type=float, default=D.slo_window_size, help="seconds of history the SLO metrics cover")
    a(
        "--slo-monitoring-interval",
        type=float,
        default=D.slo_monitoring_interval,
        help="seconds between two decisions of the SLO-aware controller",
    )
    a(
        "--initial-prefill-sm",
        type=int,
        default=D.initial_prefill_sm,
        help="prefill's share of the machine's compute in %% (CPU: cores and CFS quota, docs/semi_pd.md)",
    )
    a("--initial-decode-sm", type=int, default=D.initial_decode_sm, help="decode's share in %%")
    a(
        "--semi-pd-switch",
        default=D.semi_pd_switch,
        choices=("in_place", "rotation"),
        help="how a new split takes effect: in_place (each worker re-pins between two steps) or rotation "
        "(standby workers started with the new shares, switched to between steps, old ones retired)",
    )


def args_from_namespace(ns: argparse.Namespace) -> ServerArgs:
    return ServerArgs(**{k: v for k, v in vars(ns).items() if k in ServerArgs.field_names()})


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"--port: cannot listen on {host}:{port} ({e.strerror})") from None


def served_name(args: ServerArgs, model_path: str) -> str:
    from pdserve.model.paths import DEFAULT_MODEL_NAME

    if args.served_model_name:
        return args.served_model_name
    if args.model_path in (None, "", "default"):
        return DEFAULT_MODEL_NAME
    return os.path.basename(os.path.normpath(model_path))


async def serve(args: ServerArgs) -> None:
    import uvicorn

    from pdserve.model.paths import resolve_model_path
    from pdserve.server.http_server import build_app
    from pdserve.server.metrics import ServerMetrics
    from pdserve.server.tokenizer_manager import TokenizerManager

    model_path = resolve_model_path(args.model_path)
    name = served_name(args, model_path)
    metrics = ServerMetrics(name)
    tm = TokenizerManager(args, metrics)
    await tm.start()
    app = build_app(tm, metrics, name, model_path)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3, access_log=False
    )
    server = uvicorn.Server(config)
    log = logging.getLogger("pdserve")
    log.info(
        "model %s loaded in %.1f s; KV pool %d tokens; dtype %s",
        name,
        tm.info["load_seconds"],
        tm.info["max_total_num_tokens"],
        tm.info["dtype"],
    )
    url = f"http://{args.host}:{args.port}"
    mode = args.disaggregation_mode
    if mode == DisaggregationMode.NULL:
        print(
            f"pdserve is serving {name} at {url}\n"
            f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{name}", "messages": [{{"role": "user", "content": '
            f'"What is the capital of France?"}}], "max_tokens": 32, "temperature": 0}}\'',
            flush=True,
        )
    else:
        boot = f" {args.disaggregation_bootstrap_port}" if mode == DisaggregationMode.PREFILL else ""
        print(
            f"pdserve PD {mode} server for {name} at {url}: it answers only requests from a PD router, "
            f"not clients directly.\n  register it with the router: pdserve router --pd-disaggregation "
            f"--{mode} {url}{boot} ... (or run the whole deployment with `pdserve launch`)",
            flush=True,
        )
    try:
        await server.serve()
    finally:
        await tm.shutdown()


def main(argv: list[str]) -> int:
    from pdserve.cli import fail

    parser = build_parser()
    ns = parser.parse_args(argv)
    prog = parser.prog
    try:
        if ns.device != "cpu":
            raise ValueError(f"--device {ns.device!r}: this build of pdserve runs on cpu only; use --device cpu")
        args = args_from_namespace(ns)
        from pdserve.server.preflight import check_model

        check_model(args)
        check_port(args.host, args.port)
    except (ValueError, FileNotFoundError) as e:
        if ns.debug:
            raise
        return fail(prog, str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s [%(name)s] %(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except (RuntimeError, ValueError, OSError) as e:
        if ns.debug or args.log_level == "debug":
            raise
        return fail(prog, str(e))
    return 0
