"""The PD queues as the scheduler process sees them.

The engine defines this contract; the disagg layer implements it (disagg/prefill.py:
PrefillDisagg, disagg/decode.py: DecodeDisagg, their common part in disagg/endpoints.py)
and builds it (disagg/setup.py: build_pd_queues). The scheduler process's entry point
(disagg/scheduler_process_main.py) hands that builder to `SchedulerProcess`, so the engine
never imports the disagg layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from pdserve.config import ServerArgs
from pdserve.engine.request import Req
from pdserve.engine.scheduler import Scheduler
from pdserve.messages import DecodeQueueStats, PrefillQueueStats


class PDQueues(ABC):
    """Requests of a PD server before (decode) or after (prefill) their time in the
    scheduler's batch, while their KV moves. One per scheduler process, stepped before
    each scheduler step."""

    @abstractmethod
    def add(self, req: Req) -> None:
        """A new request of this server; it carries its bootstrap fields."""

    @abstractmethod
    def abort(self, rid: str) -> bool:
        """End `rid` if the queues hold it; False: it is the scheduler's to abort."""

    @abstractmethod
    def step(self) -> None:
        """Move on the requests whose transfer state changed (into or out of the scheduler)."""

    @abstractmethod
    def has_work(self) -> bool:
        """Requests wait on a transfer: the loop must keep stepping the queues."""

    @abstractmethod
    def stats(self) -> PrefillQueueStats | DecodeQueueStats:
        """The queues' part of /get_load and the periodic log line."""

    @abstractmethod
    def wake_fileno(self) -> int:
        """A file descriptor that turns readable when a transfer endpoint changes state: the
        idle loop sleeps on it together with its message socket."""

    @abstractmethod
    def drain_wakeups(self) -> None:
        """Empty `wake_fileno` after a wait."""

    @abstractmethod
    def table_sizes(self) -> dict[str, int]:
        """Sizes of the per-request tables the queues and their transfer threads hold (memdebug)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the transfer managers and the bootstrap server."""


@dataclass(frozen=True)
class PDContext:
    """What the PD queues are built from (scheduler_process.py: SchedulerProcess)."""

    args: ServerArgs
    scheduler: Scheduler
    kv_pools: list[torch.Tensor | None]  # each tp rank's KV pool (rank 0's is the runner's)
    kv_shm: list[str | None]  # each pool's shared-memory name; None: private memory
    total_num_kv_heads: int  # of the whole model, all tp ranks


PDSetup = Callable[[PDContext], PDQueues]
