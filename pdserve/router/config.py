"""Frozen configuration of the router: what the CLI builds and everything else reads.

The defaults here are the CLI's defaults (`cli.py` reads them), so a router started
from Python (`RouterConfig(...)`) behaves like one started from the command line.
Flag names and meanings follow SGLang's `sglang_router.launch_router` where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse

POLICY_NAMES = ("random", "round_robin", "power_of_two", "cache_aware")

# The prefill server's own bootstrap port when the router sends `bootstrap_port: null`.
DEFAULT_BOOTSTRAP_PORT = 8998


@dataclass(frozen=True)
class PrefillSpec:
    """One `--prefill URL [BOOTSTRAP_PORT]`; `bootstrap_port=None` is sent as JSON null."""

    url: str
    bootstrap_port: int | None = None


@dataclass(frozen=True)
class RetryConfig:
    """Retries on a new pair, for connection errors and retryable statuses.

    `max_retries` counts retries after the first attempt (SGLang's
    `--retry-max-retries` counts attempts; see docs/router.md).
    """

    max_retries: int = 3
    initial_backoff_ms: int = 50
    max_backoff_ms: int = 30_000
    backoff_multiplier: float = 1.5
    jitter_factor: float = 0.2


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """Per-worker breaker: `failure_threshold` consecutive failures open it for
    `timeout_duration_secs`; then one probe request at a time (half-open) and
    `success_threshold` successes close it again."""

    enabled: bool = True
    failure_threshold: int = 5
    success_threshold: int = 2
    timeout_duration_secs: float = 30.0


@dataclass(frozen=True)
class HealthCheckConfig:
    """Background `GET <worker><endpoint>` every `interval_secs`."""

    enabled: bool = True
    interval_secs: float = 10.0
    timeout_secs: float = 5.0
    failure_threshold: int = 2
    success_threshold: int = 1
    endpoint: str = "/health"


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs; `validate()` raises `ValueError` naming the CLI flag."""

    pd_disaggregation: bool = False
    prefill: tuple[PrefillSpec, ...] = ()
    decode: tuple[str, ...] = ()
    worker_urls: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "cache_aware"
    prefill_policy: str | None = None  # None: `policy`
    decode_policy: str | None = None  # None: `policy`
    api_key: str | None = None
    request_timeout_secs: float = 1800.0
    connect_timeout_secs: float = 10.0
    # cache_aware (SGLang's names and defaults, tree size in characters)
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 1 << 24
    # power_of_two / cache_aware read /get_load this often (0 disables polling)
    load_check_interval_secs: float = 2.0
    retry: RetryConfig = field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    # SGLang's router allows 512 MiB; the servers behind refuse more than 32 MiB anyway
    max_payload_size: int = 32 * 1024 * 1024
    # what the router sends to the workers (None: `api_key`): `pdserve serve --api-key` and,
    # for the admin fan-outs (/flush_cache, /abort_request), `--admin-api-key`
    worker_api_key: str | None = None
    worker_admin_api_key: str | None = None  # None: the worker key
    log_level: str = "info"

    def __post_init__(self) -> None:
        # accept lists and bare host:port from Python callers; store normalized tuples
        prefill = tuple(
            p if isinstance(p, PrefillSpec) else PrefillSpec(*p) if isinstance(p, (tuple, list)) else PrefillSpec(p)
            for p in self.prefill
        )
        object.__setattr__(self, "prefill", tuple(PrefillSpec(normalize_url(p.url), p.bootstrap_port) for p in prefill))
        object.__setattr__(self, "decode", tuple(normalize_url(u) for u in self.decode))
        object.__setattr__(self, "worker_urls", tuple(normalize_url(u) for u in self.worker_urls))

    @property
    def effective_prefill_policy(self) -> str:
        return self.prefill_policy or self.policy

    @property
    def effective_decode_policy(self) -> str:
        return self.decode_policy or self.policy

    def validate(self) -> "RouterConfig":
        """Checks every field; returns self so it chains."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}: {why}")

        if self.pd_disaggregation:
            if not self.prefill:
                bad("--prefill", "needs at least one URL in PD mode")
            if not self.decode:
                bad("--decode", "needs at least one URL in PD mode")
            if self.worker_urls:
                bad("--worker-urls", "is for plain mode; use --prefill/--decode with --pd-disaggregation")
            for p in self.prefill:
                check_url("--prefill", p.url)
                if p.bootstrap_port is not None and not (0 < p.bootstrap_port < 65536):
                    bad("--prefill", f"bootstrap port {p.bootstrap_port} is not in 1..65535")
            for u in self.decode:
                check_url("--decode", u)
        else:
            if self.prefill or self.decode:
                bad("--prefill/--decode", "need --pd-disaggregation")
            if not self.worker_urls:
                bad("--worker-urls", "needs at least one URL (or use --pd-disaggregation)")
            for u in self.worker_urls:
                check_url("--worker-urls", u)
        urls = self.all_urls()
        if len(set(urls)) != len(urls):
            bad("worker URLs", f"list a URL twice: {sorted(u for u in set(urls) if urls.count(u) > 1)}")
        if not (0 <= self.port < 65536):
            bad("--port", "must be in 0..65535 (0 = any free port)")
        for name in ("policy", "prefill_policy", "decode_policy"):
            v = getattr(self, name)
            if v is not None and v not in POLICY_NAMES:
                bad("--" + name.replace("_", "-"), f"must be one of {', '.join(POLICY_NAMES)} (got {v!r})")
        if self.request_timeout_secs <= 0:
            bad("--request-timeout-secs", "must be > 0")
        if self.connect_timeout_secs <= 0:
            bad("--connect-timeout-secs", "must be > 0")
        if not (0.0 <= self.cache_threshold <= 1.0):
            bad("--cache-threshold", "must be in [0, 1]")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            bad("--balance-abs-threshold/--balance-rel-threshold", "need abs >= 0 and rel >= 1")
        if self.max_tree_size < 1:
            bad("--max-tree-size", "must be >= 1")
        if self.load_check_interval_secs < 0:
            bad("--load-check-interval-secs", "must be >= 0")
        r = self.retry
        if r.max_retries < 0:
            bad("--retry-max-retries", "must be >= 0")
        if r.initial_backoff_ms < 0 or r.max_backoff_ms < r.initial_backoff_ms:
            bad("--retry-initial-backoff-ms/--retry-max-backoff-ms", "need 0 <= initial <= max")
        if r.backoff_multiplier < 1.0:
            bad("--retry-backoff-multiplier", "must be >= 1")
        if not (0.0 <= r.jitter_factor <= 1.0):
            bad("--retry-jitter-factor", "must be in [0, 1]")
        cb = self.circuit_breaker
        if cb.failure_threshold < 1 or cb.success_threshold < 1:
            bad("--cb-failure-threshold/--cb-success-threshold", "must be >= 1")
        if cb.timeout_duration_secs <= 0:
            bad("--cb-timeout-duration-secs", "must be > 0")
        h = self.health
        if h.interval_secs <= 0 or h.timeout_secs <= 0:
            bad("--health-check-interval-secs/--health-check-timeout-secs", "must be > 0")
        if h.failure_threshold < 1 or h.success_threshold < 1:
            bad("--health-failure-threshold/--health-success-threshold", "must be >= 1")
        if not h.endpoint.startswith("/"):
            bad("--health-check-endpoint", "must start with '/'")
        if self.max_payload_size < 1024:
            bad("--max-payload-size", "must be >= 1024 bytes")
        return self

    def all_urls(self) -> list[str]:
        return [p.url for p in self.prefill] + list(self.decode) + list(self.worker_urls)


def normalize_url(url: str) -> str:
    """`host:port` gets `http://`; a trailing slash goes."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def check_url(name: str, url: str) -> None:
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ValueError(f"{name}: {url!r} is not an http(s)://host[:port] URL")
    try:
        p.port
    except ValueError:
        raise ValueError(f"{name}: {url!r} has a bad port") from None
