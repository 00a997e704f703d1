"""The KV transfer interface (SGLang's `disaggregation/base/conn.py`, typed).

One manager per engine rank owns the transfer machinery; the scheduler creates one sender
(prefill) or receiver (decode) per request and polls it without blocking.

KV buffer contract: `kv_data` is one contiguous tensor
``[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`` (the rank's local heads),
so page p is the contiguous byte block ``kv_data[p]`` of `page_nbytes` bytes.
"""

from __future__ import annotations

import ipaddress
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import numpy as np
import torch

from pdserve.disagg.metadata import U64_MAX, KVMetadata
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.heads import head_range
from pdserve.disagg.transfer.stats import StatsRecorder, TransferStats

if TYPE_CHECKING:
    from typing import Self

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}

PageIndices = Sequence[int] | np.ndarray | torch.Tensor


class KVTransferError(RuntimeError):
    """Raised by `failure_exception()`: the request's KV transfer failed, with the reason."""

    def __init__(self, room: int, reason: str) -> None:
        super().__init__(f"KV transfer of room {room} failed: {reason}")
        self.room = room
        self.reason = reason


@dataclass(frozen=True)
class KVLayout:
    """What both sides must agree on (checked at bootstrap)."""

    page_size: int
    num_layers: int
    total_kv_heads: int  # across all tp ranks of the instance
    head_dim: int
    dtype: str

    def mismatch(self, other: "KVLayout") -> str | None:
        """None when equal, else a readable list of the differing fields."""
        diffs = [
            f"{f}: {getattr(self, f)} here vs {getattr(other, f)} there"
            for f in ("page_size", "num_layers", "total_kv_heads", "head_dim", "dtype")
            if getattr(self, f) != getattr(other, f)
        ]
        return "; ".join(diffs) or None


@dataclass
class KVArgs:
    """What a manager needs from its engine rank."""

    engine_rank: int  # tp rank of this engine inside its instance, in [0, tp_size)
    kv_data: torch.Tensor  # [num_pages, num_layers, 2, page_size, num_kv_heads(local), head_dim]
    host: str = "127.0.0.1"  # IP the other side reaches this rank at (also the bind address)
    port: int = 0  # transfer endpoint port; 0 picks a free one
    tp_size: int = 1
    total_num_kv_heads: int | None = None  # all ranks together; default: local heads * tp_size
    # (rank r holds heads [r*H//T, (r+1)*H//T): see transfer/heads.py)
    bootstrap_host: str = "127.0.0.1"  # prefill: the bootstrap server this rank registers with
    bootstrap_port: int = 8998
    shm_name: str | None = None  # decode + shm backend: segment `kv_data` was allocated in
    ib_device: str | None = None  # RDMA devices for the engines that use them (mooncake); None: TCP

    def __post_init__(self) -> None:
        kv = self.kv_data
        if not isinstance(kv, torch.Tensor) or kv.dim() != 6 or kv.shape[2] != 2:
            raise ValueError("kv_data must be a tensor [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]")
        if not kv.is_contiguous():
            raise ValueError("kv_data must be contiguous")
        if kv.dtype not in DTYPE_NAMES:
            raise ValueError(f"kv_data dtype {kv.dtype} not supported (use one of {list(DTYPE_NAMES.values())})")
        if min(kv.shape) < 1:
            raise ValueError(f"kv_data has an empty dimension: {tuple(kv.shape)}")
        if not (1 <= self.tp_size <= 4096) or not (0 <= self.engine_rank < self.tp_size):
            raise ValueError(f"engine_rank {self.engine_rank} must be in [0, tp_size={self.tp_size})")
        if self.total_num_kv_heads is None:
            self.total_num_kv_heads = self.num_kv_heads * self.tp_size
        h0, h1 = head_range(self.engine_rank, self.tp_size, int(self.total_num_kv_heads))
        if h1 - h0 != self.num_kv_heads:
            raise ValueError(
                f"rank {self.engine_rank} of tp size {self.tp_size} holds {h1 - h0} of "
                f"{self.total_num_kv_heads} KV heads, but kv_data has {self.num_kv_heads}"
            )
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"host must be an IP address, got {self.host!r}") from None
        for name in ("port", "bootstrap_port"):
            if not (0 <= getattr(self, name) < 65536):
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")

    @property
    def num_pages(self) -> int:
        return self.kv_data.shape[0]

    @property
    def num_layers(self) -> int:
        return self.kv_data.shape[1]

    @property
    def page_size(self) -> int:
        return self.kv_data.shape[3]

    @property
    def num_kv_heads(self) -> int:
        """Local heads on this rank."""
        return self.kv_data.shape[4]

    @property
    def head_dim(self) -> int:
        return self.kv_data.shape[5]

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.kv_data.dtype]

    @property
    def page_nbytes(self) -> int:
        return math.prod(self.kv_data.shape[1:]) * self.kv_data.element_size()

    @property
    def head_range(self) -> tuple[int, int]:
        """Global KV heads [start, end) this rank holds."""
        return head_range(self.engine_rank, self.tp_size, int(self.total_num_kv_heads))

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.page_size, self.num_layers, int(self.total_num_kv_heads), self.head_dim, self.dtype_name)


def check_room(room: int) -> int:
    if isinstance(room, bool) or not isinstance(room, (int, np.integer)) or not (0 <= int(room) <= U64_MAX):
        raise ValueError(f"bootstrap_room must be an integer in [0, 2^64), got {room!r}")
    return int(room)


def as_page_array(page_indices: PageIndices, num_pages: int) -> np.ndarray:
    """Page indices as a 1-D int64 array, each checked to lie in [0, num_pages)."""
    if isinstance(page_indices, torch.Tensor):
        arr = page_indices.detach().to("cpu", torch.int64).numpy().reshape(-1)
    else:
        arr = np.asarray(page_indices, dtype=np.int64).reshape(-1)
    if arr.size:
        # a few pages: Python's min/max over a list beat numpy's two reductions' set-up
        lo, hi = (min(v := arr.tolist()), max(v)) if arr.size <= 64 else (int(arr.min()), int(arr.max()))
        if lo < 0 or hi >= num_pages:
            raise ValueError(f"page indices must lie in [0, {num_pages}), got [{lo}, {hi}]")
    return np.ascontiguousarray(arr)


class BaseKVManager(ABC):
    """Owns one rank's transfer machinery (listeners, threads, connections, statistics)."""

    def __init__(self, args: KVArgs, mode: DisaggregationMode) -> None:
        if mode not in (DisaggregationMode.PREFILL, DisaggregationMode.DECODE):
            raise ValueError(f"a KV manager runs in prefill or decode mode, not {mode}")
        self.args = args
        self.mode = mode
        self._stats = StatsRecorder()

    def stats(self) -> TransferStats:
        return self._stats.snapshot()

    def table_sizes(self) -> dict[str, int]:
        """Sizes of the per-request tables this manager holds (memory debugging)."""
        return {}

    def wait_registered(self, timeout: float) -> bool:
        """Prefill: wait until this rank is registered with the bootstrap server; True once
        it is (backends that register nothing: at once)."""
        return True

    def create_endpoint(self, cls: type, bootstrap_addr: str, bootstrap_room: int, **kw: Any) -> Any:
        """A request's sender or receiver (`cls`, from the registry) on this manager."""
        return cls(self, bootstrap_addr, bootstrap_room, **kw)

    def shutdown(self) -> None:
        """Stop threads, close sockets; idempotent."""

    def __enter__(self) -> "Self":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class BaseKVSender(ABC):
    """Prefill side, one per request. Call order: poll() until WaitingForInput, init(num_pages),
    run the forward, send(page_indices, metadata), poll() until Success or Failed."""

    @abstractmethod
    def __init__(
        self,
        mgr: BaseKVManager,
        bootstrap_addr: str,
        bootstrap_room: int,
        dest_tp_ranks: list[int] | None = None,
        pp_rank: int | None = None,
    ) -> None: ...

    @abstractmethod
    def init(self, num_pages: int) -> None:
        """Declare how many KV pages the request has (must equal decode's page count)."""

    @abstractmethod
    def send(self, page_indices: PageIndices, metadata: KVMetadata | None = None) -> None:
        """Queue these prefill pages (the next chunk, in order) for transfer; the call that
        carries `metadata` is the last one. Non-blocking."""

    @abstractmethod
    def poll(self) -> KVPoll: ...

    @abstractmethod
    def failure_exception(self) -> NoReturn:
        """Raise KVTransferError with the reason (SGLang raises here too)."""

    @abstractmethod
    def abort(self) -> None:
        """Give up on the request: state Failed, nothing more is sent for it."""

    @property
    def busy(self) -> bool:
        """A write under way still reads the request's prefill pages (the sender failed or was
        aborted meanwhile): they may not be freed or reused yet (backends that read nothing
        after failing: never)."""
        return False


class BaseKVReceiver(ABC):
    """Decode side, one per request. Call order: poll() until WaitingForInput (prefill found),
    allocate pages, init(page_indices), poll() until Success, get_metadata()."""

    @abstractmethod
    def __init__(
        self, mgr: BaseKVManager, bootstrap_addr: str, bootstrap_room: int, data_parallel_rank: int | None = None
    ) -> None: ...

    @abstractmethod
    def init(self, page_indices: PageIndices) -> None:
        """Tell prefill where this request's KV goes (decode's own page indices). Non-blocking."""

    @abstractmethod
    def poll(self) -> KVPoll: ...

    @abstractmethod
    def get_metadata(self) -> KVMetadata | None:
        """The record prefill sent (first token, logprob, cached tokens); None before Success."""

    @abstractmethod
    def failure_exception(self) -> NoReturn: ...

    @abstractmethod
    def abort(self) -> None:
        """Give up: once this returns no more bytes are written to the request's pages."""

    @property
    def busy(self) -> bool:
        """A write into the request's pages is still under way: they may not be reused yet
        (backends whose writes end with abort(): never)."""
        return False


class BaseKVBootstrapServer(ABC):
    """Runs beside a prefill instance; its ranks register there, decode looks them up."""

    @abstractmethod
    def __init__(self, host: str, port: int) -> None: ...

    @property
    @abstractmethod
    def port(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    def table_sizes(self) -> dict[str, int]:
        """Sizes of the per-request tables this server holds (memory debugging)."""
        return {}
