"""`pdserve router ...`: flags (SGLang's `launch_router` names) -> `RouterConfig` -> serve.

    pdserve router --pd-disaggregation --prefill http://127.0.0.1:30000 8998 \\
        --decode http://127.0.0.1:30001 --port 8000
    pdserve router --worker-urls http://127.0.0.1:30000 http://127.0.0.1:30001
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from pdserve.router.config import (
    POLICY_NAMES,
    CircuitBreakerConfig,
    HealthCheckConfig,
    PrefillSpec,
    RetryConfig,
    RouterConfig,
)

D, R, C, H = RouterConfig, RetryConfig, CircuitBreakerConfig, HealthCheckConfig
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")


def _number(kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """An argparse type: a number in a range (the error names the flag)."""

    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a valid {kind.__name__}") from None
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo} (got {s})")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi} (got {s})")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    from pdserve.cli import Parser

    p = Parser(
        prog="pdserve router",
        description="Router in front of pdserve (or SGLang) servers: PD pairs or plain balancing.",
    )
    a = p.add_argument
    a("--host", default=D.host, help="address to bind (use 0.0.0.0 only behind a firewall)")
    a("--port", type=_number(int, 0, 65535), default=D.port, help="port to bind (0: any free port)")
    g = p.add_argument_group("workers")
    g.add_argument("--pd-disaggregation", action="store_true", help="PD mode: --prefill/--decode pairs")
    g.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        default=[],
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="prefill server URL and optional bootstrap port (a number or 'none'); repeatable",
    )
    g.add_argument(
        "--decode", nargs="+", action="append", default=[], metavar="URL", help="decode server URL; repeatable"
    )
    g.add_argument("--worker-urls", nargs="*", default=[], metavar="URL", help="plain mode: server URLs")
    g = p.add_argument_group("routing policy")
    g.add_argument("--policy", choices=POLICY_NAMES, default=D.policy, help="policy for every role")
    g.add_argument("--prefill-policy", choices=POLICY_NAMES, default=None, help="PD: prefill's policy")
    g.add_argument("--decode-policy", choices=POLICY_NAMES, default=None, help="PD: decode's policy")
    g.add_argument(
        "--cache-threshold",
        type=_number(float, 0, 1),
        default=D.cache_threshold,
        help="cache_aware: least matched fraction of the prompt to follow the cache",
    )
    g.add_argument(
        "--balance-abs-threshold",
        type=_number(int, 0),
        default=D.balance_abs_threshold,
        help="cache_aware: balance load when max - min exceeds this ...",
    )
    g.add_argument(
        "--balance-rel-threshold",
        type=_number(float, 1),
        default=D.balance_rel_threshold,
        help="... and max > min * this",
    )
    g.add_argument(
        "--max-tree-size",
        type=_number(int, 1),
        default=D.max_tree_size,
        help="cache_aware: characters remembered per worker (LRU eviction)",
    )
    g.add_argument(
        "--load-check-interval-secs",
        type=_number(float, 0),
        default=D.load_check_interval_secs,
        help="how often load-aware policies poll /get_load (0: never)",
    )
    g = p.add_argument_group("requests")
    g.add_argument(
        "--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'; also sent to the workers"
    )
    g.add_argument(
        "--worker-api-key", default=None, help="key sent to the workers (their --api-key); default: --api-key"
    )
    g.add_argument(
        "--worker-admin-api-key",
        default=None,
        help="key sent to the workers on /flush_cache and "
        "/abort_request (their --admin-api-key); default: the worker key",
    )
    g.add_argument(
        "--request-timeout-secs",
        type=_number(float, 0, lo_open=True),
        default=D.request_timeout_secs,
        help="limit on one upstream request, streaming included",
    )
    g.add_argument(
        "--connect-timeout-secs",
        type=_number(float, 0, lo_open=True),
        default=D.connect_timeout_secs,
        help="limit on connecting to a worker",
    )
    g.add_argument(
        "--max-payload-size", type=_number(int, 1024), default=D.max_payload_size, help="largest request body in bytes"
    )
    g = p.add_argument_group("retries (on a new pair, before anything reached the client)")
    g.add_argument(
        "--retry-max-retries",
        "--max-retries",
        dest="max_retries",
        type=_number(int, 0),
        default=R.max_retries,
        help="retries after the first attempt",
    )
    g.add_argument(
        "--retry-initial-backoff-ms",
        type=_number(int, 0),
        default=R.initial_backoff_ms,
        help="wait before the first retry",
    )
    g.add_argument(
        "--retry-max-backoff-ms", type=_number(int, 0), default=R.max_backoff_ms, help="longest wait between retries"
    )
    g.add_argument(
        "--retry-backoff-multiplier",
        type=_number(float, 1),
        default=R.backoff_multiplier,
        help="each wait is the previous one times this",
    )
    g.add_argument(
        "--retry-jitter-factor",
        type=_number(float, 0, 1),
        default=R.jitter_factor,
        help="waits vary randomly by up to this fraction",
    )
    g.add_argument("--disable-retries", action="store_true", help="one attempt per request")
    g = p.add_argument_group("circuit breaker (per worker)")
    g.add_argument(
        "--cb-failure-threshold",
        type=_number(int, 1),
        default=C.failure_threshold,
        help="consecutive failures that open the circuit",
    )
    g.add_argument(
        "--cb-success-threshold",
        type=_number(int, 1),
        default=C.success_threshold,
        help="half-open successes that close it",
    )
    g.add_argument(
        "--cb-timeout-duration-secs",
        type=_number(float, 0, lo_open=True),
        default=C.timeout_duration_secs,
        help="how long it stays open before a probe",
    )
    g.add_argument("--disable-circuit-breaker", action="store_true", help="never take a worker out of rotation")
    g = p.add_argument_group("health checks")
    g.add_argument(
        "--health-check-interval-secs",
        type=_number(float, 0, lo_open=True),
        default=H.interval_secs,
        help="seconds between health checks of each worker",
    )
    g.add_argument(
        "--health-check-timeout-secs",
        type=_number(float, 0, lo_open=True),
        default=H.timeout_secs,
        help="a health check slower than this fails",
    )
    g.add_argument(
        "--health-failure-threshold",
        type=_number(int, 1),
        default=H.failure_threshold,
        help="failed checks in a row that mark a worker unhealthy",
    )
    g.add_argument(
        "--health-success-threshold",
        type=_number(int, 1),
        default=H.success_threshold,
        help="passed checks in a row that mark it healthy again",
    )
    g.add_argument("--health-check-endpoint", default=H.endpoint, help="path probed on each worker")
    g.add_argument("--disable-health-check", action="store_true", help="no background health checks")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=D.log_level, help="logging level")
    return p


def _prefill_specs(p: argparse.ArgumentParser, groups: list[list[str]]) -> tuple[PrefillSpec, ...]:
    specs = []
    for g in groups:
        if len(g) > 2:
            p.error(f"argument --prefill: expected URL [BOOTSTRAP_PORT], got {' '.join(g)!r}")
        port = None
        if len(g) == 2 and g[1].lower() != "none":
            try:
                port = int(g[1])
            except ValueError:
                p.error(f"argument --prefill: bootstrap port {g[1]!r} is not a number or 'none'")
            if not (0 < port < 65536):
                p.error(f"argument --prefill: bootstrap port {port} is not in 1..65535")
        specs.append(PrefillSpec(g[0], port))
    return tuple(specs)


def config_from_args(argv: list[str]) -> RouterConfig:
    """Parses `argv` into a validated config (argparse exits with a message on errors)."""
    p = build_parser()
    ns = p.parse_args(argv)
    try:
        return RouterConfig(
            pd_disaggregation=ns.pd_disaggregation,
            prefill=_prefill_specs(p, ns.prefill),
            decode=tuple(u for g in ns.decode for u in g),
            worker_urls=tuple(ns.worker_urls),
            host=ns.host,
            port=ns.port,
            policy=ns.policy,
            prefill_policy=ns.prefill_policy,
            decode_policy=ns.decode_policy,
            api_key=ns.api_key,
            worker_api_key=ns.worker_api_key,
            worker_admin_api_key=ns.worker_admin_api_key,
            request_timeout_secs=ns.request_timeout_secs,
            connect_timeout_secs=ns.connect_timeout_secs,
            cache_threshold=ns.cache_threshold,
            balance_abs_threshold=ns.balance_abs_threshold,
            balance_rel_threshold=ns.balance_rel_threshold,
            max_tree_size=ns.max_tree_size,
            load_check_interval_secs=ns.load_check_interval_secs,
            retry=RetryConfig(
                max_retries=0 if ns.disable_retries else ns.max_retries,
                initial_backoff_ms=ns.retry_initial_backoff_ms,
                max_backoff_ms=ns.retry_max_backoff_ms,
                backoff_multiplier=ns.retry_backoff_multiplier,
                jitter_factor=ns.retry_jitter_factor,
            ),
            circuit_breaker=CircuitBreakerConfig(
                enabled=not ns.disable_circuit_breaker,
                failure_threshold=ns.cb_failure_threshold,
                success_threshold=ns.cb_success_threshold,
                timeout_duration_secs=ns.cb_timeout_duration_secs,
            ),
            health=HealthCheckConfig(
                enabled=not ns.disable_health_check,
                interval_secs=ns.health_check_interval_secs,
                timeout_secs=ns.health_check_timeout_secs,
                failure_threshold=ns.health_failure_threshold,
                success_threshold=ns.health_success_threshold,
                endpoint=ns.health_check_endpoint,
            ),
            max_payload_size=ns.max_payload_size,
            log_level=ns.log_level,
        ).validate()
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits


def main(argv: list[str]) -> int:
    config = config_from_args(argv)
    level = {"warn": "WARNING"}.get(config.log_level, config.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pdserve.router.serve import serve  # aiohttp only once the flags are good

    asyncio.run(serve(config))
    return 0
