"""Shared helpers of the KV transfer tests (also imported by spawned child processes)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from pdserve.disagg.transfer.bootstrap import KVBootstrapServer
from pdserve.disagg.mode import DisaggregationMode
from pdserve.disagg.poll import KVPoll
from pdserve.disagg.transfer.base import KVArgs
from pdserve.disagg.transfer.registry import KVClassType, TransferBackend, get_kv_class, missing_package
from pdserve.engine.shm_segment import allocate_kv_buffer, new_shm_name

# the transfer engines (optional extras, installed by scripts/setup.sh): the same tests as
# tcp/shm; skipped, with the reason, only where the package cannot load
ENGINE_BACKENDS = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            bool(missing_package(TransferBackend(b))), reason=str(missing_package(TransferBackend(b)))
        ),
    )
    for b in ("nixl", "mooncake")
]

# [num_pages, num_layers, 2, page_size, heads, head_dim]
SHAPE = (128, 2, 2, 4, 4, 8)
# Timeouts short enough to test them, long enough that a sender or receiver does not time out
# on a busy 2-core box while the other side is still setting up (1 s / 1.5 s flaked there
# once five backends, each with its own threads, ran in one process)
FAST = dict(
    bootstrap_timeout=3.0,
    waiting_timeout=4.0,
    heartbeat_interval=0.2,
    heartbeat_max_failure=2,
    thread_pool_size=4,
    queue_size=2,
    io_timeout=5.0,
)


def random_kv(shape=SHAPE, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def poll_until(obj, states: set[KVPoll], timeout: float = 5.0) -> KVPoll:
    wait_for(lambda: obj.poll() in states, timeout)
    return obj.poll()


def make_manager(
    backend: str,
    mode: DisaggregationMode,
    kv: torch.Tensor | None = None,
    *,
    engine_rank: int = 0,
    tp_size: int = 1,
    bootstrap_port: int = 8998,
    shape=SHAPE,
    dtype=torch.bfloat16,
    seed: int = 0,
    total_num_kv_heads: int | None = None,
    **overrides,
):
    """A tcp/shm manager; decode+shm buffers are allocated in shared memory."""
    shm_name = None
    if kv is None:
        if backend == "shm" and mode == DisaggregationMode.DECODE:
            shm_name = new_shm_name()
            kv = allocate_kv_buffer(shape, dtype, shm_name)
        elif mode == DisaggregationMode.DECODE:
            kv = torch.zeros(shape, dtype=dtype)
        else:
            kv = random_kv(shape, dtype, seed)
    args = KVArgs(
        engine_rank=engine_rank,
        kv_data=kv,
        tp_size=tp_size,
        bootstrap_port=bootstrap_port,
        shm_name=shm_name,
        total_num_kv_heads=total_num_kv_heads,
    )
    cls = get_kv_class(backend, KVClassType.MANAGER)
    return cls(args, mode, **{**FAST, **overrides})


class Pair:
    """A bootstrap server, a prefill manager and a decode manager of one backend, in-process."""

    def __init__(self, backend: str, **overrides) -> None:
        self.backend = backend
        self.bs = KVBootstrapServer("127.0.0.1", 0)
        self.prefill = make_manager(backend, DisaggregationMode.PREFILL, bootstrap_port=self.bs.port, **overrides)
        self.decode = make_manager(backend, DisaggregationMode.DECODE, **overrides)
        assert self.prefill.wait_registered(5)
        self.sender_cls = get_kv_class(backend, KVClassType.SENDER)
        self.receiver_cls = get_kv_class(backend, KVClassType.RECEIVER)

    @property
    def pkv(self) -> torch.Tensor:
        return self.prefill.args.kv_data

    @property
    def dkv(self) -> torch.Tensor:
        return self.decode.args.kv_data

    def sender(self, room: int):
        return self.sender_cls(self.prefill, self.bs.addr, room)

    def receiver(self, room: int):
        return self.receiver_cls(self.decode, self.bs.addr, room)

    def close(self) -> None:
        self.prefill.shutdown()
        self.decode.shutdown()
        self.bs.close()
        if self.decode.args.shm_name:
            from pdserve.engine.shm_segment import free_kv_buffer

            free_kv_buffer(self.decode.args.shm_name)
