"""Environment knobs of the KV transfer layer, typed and validated in one place.

Each knob keeps SGLang's name and default; the same name with the `SGLANG_` prefix replaced
by `PDSERVE_` wins over it (``PDSERVE_DISAGGREGATION_BOOTSTRAP_TIMEOUT`` over
``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``). A value that does not parse or is out of
range raises ValueError naming the variable that was read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


def default_thread_pool_size(cpu_count: int | None = None) -> int:
    """SGLang's formula (mooncake conn): min(max(4, int(0.75 * cpu_count) // 8), 12)."""
    n = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return min(max(4, int(0.75 * n) // 8), 12)


def _lookup(name: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable actually read, its raw value) or None when neither spelling is set."""
    assert name.startswith("SGLANG_")
    ours = "PDSERVE_" + name[len("SGLANG_") :]
    for var in (ours, name):
        raw = environ.get(var)
        if raw is not None and raw.strip() != "":
            return var, raw.strip()
    return None


def env_int(name: str, default: int, minimum: int, environ: Mapping[str, str] | None = None) -> int:
    found = _lookup(name, os.environ if environ is None else environ)
    if found is None:
        return default
    var, raw = found
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"{var}={raw!r}: must be >= {minimum}")
    return value


def env_float(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """A positive, finite number of seconds."""
    found = _lookup(name, os.environ if environ is None else environ)
    if found is None:
        return default
    var, raw = found
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected a number of seconds > 0") from None
    if not (value > 0.0 and value != float("inf")):
        raise ValueError(f"{var}={raw!r}: must be a finite number of seconds > 0")
    return value


def tcp_piece_bytes(environ: Mapping[str, str] | None = None) -> int:
    """tcp backend: the smallest piece a transfer to one decode rank is cut into, so a
    transfer of B bytes goes over min(QUEUE_SIZE, B / this) connections at once
    (``PDSERVE_DISAGGREGATION_TCP_PIECE_KB``, pdserve's own knob; SGLang has none)."""
    env = os.environ if environ is None else environ
    var = "PDSERVE_DISAGGREGATION_TCP_PIECE_KB"
    raw = env.get(var, "").strip()
    if not raw:
        return TCP_PIECE_KB_DEFAULT << 10
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected an integer number of KiB >= 64") from None
    if value < 64:
        raise ValueError(f"{var}={raw!r}: must be >= 64 (KiB)")
    return value << 10


TCP_PIECE_KB_DEFAULT = 1024  # chosen by measurement: docs/benchmarks.md, "Transfer engines"


@dataclass(frozen=True)
class DisaggEnvs:
    thread_pool_size: int  # transfer worker threads per rank (prefill)
    queue_size: int  # parallel transfer queues, each with its own connections (prefill)
    bootstrap_timeout: float  # s: prefill sender waiting for decode's page indices
    heartbeat_interval: float  # s: decode -> prefill bootstrap /health period
    heartbeat_max_failure: int  # consecutive misses before that prefill counts as dead
    waiting_timeout: float  # s: decode receiver waiting for the KV after init()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DisaggEnvs":
        return cls(
            thread_pool_size=env_int("SGLANG_DISAGGREGATION_THREAD_POOL_SIZE", default_thread_pool_size(), 1, environ),
            queue_size=env_int("SGLANG_DISAGGREGATION_QUEUE_SIZE", 4, 1, environ),
            bootstrap_timeout=env_float("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300.0, environ),
            heartbeat_interval=env_float("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL", 5.0, environ),
            heartbeat_max_failure=env_int("SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE", 2, 1, environ),
            waiting_timeout=env_float("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", 300.0, environ),
        )
