"""Server arguments: one frozen dataclass; argparse lives in the CLI only."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from pdserve.enums import AttentionBackend, DisaggregationMode, DType, Quantization, TransferBackend
from pdserve.setting_checks import TOOL_CALL_PARSERS, hub_name_hint, int8_matmul_missing, missing_package

DTYPES = tuple(d.value for d in DType)
ATTENTION_BACKENDS = tuple(b.value for b in AttentionBackend)
QUANTIZATIONS = tuple(q.value for q in Quantization)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SEMI_PD_SWITCH_MECHANISMS = ("in_place", "rotation")
SEMI_PD_SWITCHES = ("enable_semi_pd", "enable_semi_pd_coordinator", "enable_unified_memory", "enable_slo_aware")


def unified_memory_geometry_error(
    total_blocks: int, block_size: int, page_size: int, itemsize: int = 4
) -> tuple[str, str] | None:
    """(field, why) when a unified KV block pool of this geometry cannot exist, else None.

    A block holds the K and V of `page_size` tokens of one layer in `block_size` bytes, so
    `block_size` must split into 2 * page_size slots of whole elements (`itemsize` bytes)."""
    if total_blocks < 1:
        return "unified_memory_blocks", f"must be >= 1, got {total_blocks}"
    if not (1 <= page_size <= 1024):
        return "unified_memory_page_size", f"must be in 1..1024 tokens, got {page_size}"
    slot = 2 * page_size * itemsize
    if block_size < slot or block_size % slot:
        return "unified_memory_block_size", (
            f"{block_size} bytes do not hold K and V of {page_size} tokens ({page_size} = "
            f"--unified-memory-page-size) in whole {itemsize}-byte elements: use a multiple of {slot}"
        )
    total = total_blocks * block_size
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf
        ram = None
    if ram and total > ram:
        return "unified_memory_blocks", (
            f"{total_blocks} blocks of {block_size} bytes = {total / 2**30:.1f} GiB, "
            f"more than this machine's RAM ({ram / 2**30:.1f} GiB)"
        )
    return None


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = None  # None: the packaged SmolLM2-135M-Instruct GGUF
    tokenizer_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: DType = DType.AUTO
    mem_fraction_static: float | None = None  # share of free RAM for weights + KV
    max_total_tokens: int | None = None  # KV pool size in tokens (wins over mem_fraction)
    max_running_requests: int = 64
    chunked_prefill_size: int = 512
    page_size: int = 16
    disable_radix_cache: bool = False
    served_model_name: str | None = None
    log_level: str = "info"
    random_seed: int = 0
    context_length: int | None = None
    # the overlap loop measured ~3x slower single-stream decode on this CPU (docs/benchmarks.md)
    disable_overlap_schedule: bool = True
    num_threads: int | None = None  # torch threads in the scheduler (default: all cores)
    # batches of at most this many tokens use 4-bit weight-only matmuls (bf16 only; 0 = off)
    w4_decode_max_tokens: int = 8
    # w8a8_int8: the decoder layers' linears in int8 (weights per channel, activations per row)
    quantization: Quantization = Quantization.NONE
    # PD disaggregation
    disaggregation_mode: DisaggregationMode = DisaggregationMode.NULL
    disaggregation_bootstrap_port: int = 8998
    disaggregation_transfer_backend: TransferBackend = TransferBackend.TCP
    disaggregation_ib_device: str | None = None  # RDMA devices (mooncake); None: TCP transport
    tp_size: int = 1
    # KV cache data service shared by servers (docs/kvstore.md): http://host:port (`pdserve
    # kvstore`), mooncake://master_host:port or memory://; None: no store
    kv_store: str | None = None
    # seconds a request's store lookup may hold back its prefill before it computes instead
    kv_store_timeout: float = 1.0
    # auto: cpu_paged (pdserve's C++ decode kernel) where it builds, else torch_native
    attention_backend: AttentionBackend = AttentionBackend.AUTO
    # chat template for /v1/chat/completions: a Jinja file or the template text itself
    # (None: the model's own, from tokenizer_config.json or the GGUF metadata)
    chat_template: str | None = None
    # tool-call format of the model's output (pdserve/server/tools; None: from the
    # architecture, Qwen2/Qwen3 -> hermes; other models refuse `tools`)
    tool_call_parser: str | None = None
    # access and abuse (pdserve/server/guard.py)
    api_key: str | None = None  # `Authorization: Bearer KEY` on every path but /health*
    admin_api_key: str | None = None  # admin paths (/flush_cache, /abort_request) need this one
    max_payload_size: int = 32 * 1024 * 1024  # largest request body in bytes (413 above)
    # Semi-PD (pdserve/semi_pd, docs/semi_pd.md): prefill and decode workers sharing weights
    # and one KV pool with a compute split. What a server cannot honour is refused by
    # server/preflight.py: check_semi_pd.
    enable_semi_pd: bool = False  # fixed split (--initial-prefill-sm / --initial-decode-sm)
    enable_semi_pd_coordinator: bool = False  # all of it: split + unified memory + SLO-aware
    enable_unified_memory: bool = False
    enable_slo_aware: bool = False
    unified_memory_blocks: int = 1000
    unified_memory_block_size: int = 4096  # bytes per block: K and V of page_size tokens, one layer
    unified_memory_page_size: int = 16  # tokens per block
    slo_ttft_target: float = 100.0  # ms, at the 95th percentile
    slo_tpot_target: float = 50.0  # ms, at the 95th percentile
    slo_window_size: float = 30.0  # s of history the SLO metrics cover
    slo_monitoring_interval: float = 10.0  # s between two controller decisions
    initial_prefill_sm: int = 70  # % of the machine's compute (CPU: docs/semi_pd.md)
    initial_decode_sm: int = 30
    # how a new split takes effect: "in_place" (workers re-pin between two steps) or
    # "rotation" (standby workers with the new shares, switched to between steps)
    semi_pd_switch: str = "in_place"

    def __post_init__(self) -> None:
        """Validate every setting (ValueError naming the flag) and turn names into enums:
        ServerArgs is built from the CLI, from JSON and from keyword arguments (strings)."""

        def bad(flag: str, why: str) -> None:
            raise ValueError(f"--{flag.replace('_', '-')}: {why}")

        def to_enum(name: str, cls: type, why: str) -> None:
            try:
                object.__setattr__(self, name, cls(getattr(self, name)))
            except ValueError:
                bad(name, why)

        to_enum("dtype", DType, f"must be one of {DTYPES}, got {self.dtype!r}")
        to_enum(
            "attention_backend",
            AttentionBackend,
            f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}",
        )
        to_enum("quantization", Quantization, f"must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization == Quantization.W8A8_INT8 and (why := int8_matmul_missing()):
            bad("quantization", why)
        if not (0 < self.port < 65536):
            bad("port", f"must be in 1..65535, got {self.port}")
        if not (0 < self.disaggregation_bootstrap_port < 65536):
            bad("disaggregation_bootstrap_port", "must be in 1..65535")
        if self.mem_fraction_static is not None and not (0.0 < self.mem_fraction_static < 1.0):
            bad("mem_fraction_static", f"must be in (0, 1), got {self.mem_fraction_static}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            bad("max_total_tokens", f"must be at least one page ({self.page_size}), got {self.max_total_tokens}")
        if self.max_running_requests < 1:
            bad("max_running_requests", f"must be >= 1, got {self.max_running_requests}")
        if self.chunked_prefill_size < 1:
            bad("chunked_prefill_size", f"must be >= 1, got {self.chunked_prefill_size}")
        if not (1 <= self.page_size <= 1024):
            bad("page_size", f"must be in 1..1024, got {self.page_size}")
        if self.log_level.lower() not in LOG_LEVELS:
            bad("log_level", f"must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.context_length is not None and self.context_length < 2:
            bad("context_length", "must be >= 2")
        if not (0 <= self.w4_decode_max_tokens <= 64):
            bad("w4_decode_max_tokens", "must be in 0..64")
        if self.num_threads is not None and self.num_threads < 1:
            bad("num_threads", "must be >= 1")
        to_enum(
            "disaggregation_mode",
            DisaggregationMode,
            f"must be null, prefill or decode, got {self.disaggregation_mode!r}",
        )
        if self.max_payload_size < 1024:
            bad("max_payload_size", f"must be >= 1024 bytes, got {self.max_payload_size}")
        if not (1 <= self.tp_size <= 64):
            bad("tp_size", f"must be in 1..64, got {self.tp_size}")
        if self.model_path not in (None, "", "default") and not os.path.exists(self.model_path):
            hint = hub_name_hint(self.model_path)
            if hint:
                raise ValueError(hint)
            bad("model_path", f"{self.model_path!r} does not exist (pass a local model directory or .gguf file)")
        if self.chat_template is not None and not os.path.isfile(self.chat_template) and "{" not in self.chat_template:
            bad("chat_template", f"{self.chat_template!r} is neither a file nor a Jinja template")
        if self.tool_call_parser is not None:
            if self.tool_call_parser not in TOOL_CALL_PARSERS:
                bad(
                    "tool_call_parser",
                    f"must be one of {', '.join(sorted(TOOL_CALL_PARSERS))}, got {self.tool_call_parser!r}",
                )
        try:
            backend = TransferBackend.from_name(self.disaggregation_transfer_backend)
        except ValueError as e:
            bad("disaggregation_transfer_backend", str(e))
        if self.disaggregation_mode != DisaggregationMode.NULL:
            missing = missing_package(backend)
            if missing:
                bad("disaggregation_transfer_backend", missing)
        object.__setattr__(self, "disaggregation_transfer_backend", backend)
        if self.tokenizer_path is not None and not os.path.exists(self.tokenizer_path):
            bad("tokenizer_path", f"{self.tokenizer_path!r} does not exist")
        self._validate_kv_store(bad)
        self._validate_semi_pd(bad)

    def _validate_kv_store(self, bad) -> None:
        t = self.kv_store_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 60):
            bad("kv_store_timeout", f"seconds in (0, 60], got {t!r}")
        if self.kv_store is None:
            return
        from pdserve.kvstore.stores import url_error

        err = url_error(self.kv_store)
        if err is not None:
            bad("kv_store", err)

    def _validate_semi_pd(self, bad) -> None:
        for name in ("initial_prefill_sm", "initial_decode_sm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not (1 <= v <= 100):
                bad(name, f"a percentage of the machine's compute in 1..100, got {v!r}")
        total = self.initial_prefill_sm + self.initial_decode_sm
        if total > 100:
            bad(
                "initial_prefill_sm",
                f"{self.initial_prefill_sm} % + --initial-decode-sm {self.initial_decode_sm} % "
                f"= {total} %, over 100 %: the two shares must add up to at most 100",
            )
        for name in ("slo_ttft_target", "slo_tpot_target", "slo_window_size", "slo_monitoring_interval"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v < float("inf")):
                bad(name, f"must be a positive number, got {v!r}")
        if self.slo_monitoring_interval > self.slo_window_size:
            bad(
                "slo_monitoring_interval",
                f"{self.slo_monitoring_interval} s is longer than --slo-window-size "
                f"{self.slo_window_size} s: decisions would skip requests no window covers",
            )
        if self.semi_pd_switch not in SEMI_PD_SWITCH_MECHANISMS:
            bad("semi_pd_switch", f"must be one of {SEMI_PD_SWITCH_MECHANISMS}, got {self.semi_pd_switch!r}")
        err = unified_memory_geometry_error(
            self.unified_memory_blocks, self.unified_memory_block_size, self.unified_memory_page_size
        )
        if err:
            bad(*err)
        if self.semi_pd_enabled:
            if self.disaggregation_mode != DisaggregationMode.NULL:
                bad(
                    "enable_semi_pd",
                    f"Semi-PD splits one server's compute; it cannot run with "
                    f"--disaggregation-mode {self.disaggregation_mode}",
                )
            if self.tp_size != 1:
                bad("enable_semi_pd", "Semi-PD runs with --tp-size 1")

    @property
    def semi_pd_enabled(self) -> bool:
        """Any Semi-PD switch is on (each of them turns on the prefill/decode worker split)."""
        return any(getattr(self, n) for n in SEMI_PD_SWITCHES)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
