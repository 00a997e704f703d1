"""Which engine each rank runs, on which port and cores (seed 000's rules).

dp_size = world_size / 2; ranks [0, dp_size) run a prefill engine, [dp_size, world_size) a
decode engine; rank r serves on base_port + r * 500 (prefill's bootstrap server on the port
after it). A "device" is a GPU where there are GPUs and a core otherwise; prefill_tp_size and
decode_tp_size default to device_count() / 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pdserve.rl.config import BASE_PORT, PORT_STRIDE


def device_count() -> int:
    """GPUs if there are any, else the cores this process may use."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class RankPlan:
    global_rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    tp_size: int
    is_prefill: bool
    port: int

    @property
    def is_decode(self) -> bool:
        return not self.is_prefill

    @property
    def role(self) -> str:
        return "prefill" if self.is_prefill else "decode"

    @property
    def bootstrap_port(self) -> int:
        return self.port + 1

    def log_line(self) -> str:
        return (
            f"[sglang_pd_dis][local]: global_rank={self.global_rank} dp_rank={self.dp_rank} "
            f"dp_size={self.dp_size} tp_size={self.tp_size} is_prefill={self.is_prefill} "
            f"is_decode={self.is_decode}"
        )


def pd_plan(
    world_size: int,
    prefill_tp_size: int | None = None,
    decode_tp_size: int | None = None,
    base_port: int = BASE_PORT,
    devices: int | None = None,
) -> list[RankPlan]:
    if not isinstance(world_size, int) or world_size < 2 or world_size % 2:
        raise ValueError(
            f"world_size must be even and >= 2 for sglang_pd_dis (dp_size = world_size / 2), got {world_size}"
        )
    default_tp = max(1, (devices if devices is not None else device_count()) // 2)
    ptp = prefill_tp_size or default_tp
    dtp = decode_tp_size or default_tp
    for name, v in (("prefill_tp_size", ptp), ("decode_tp_size", dtp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    dp = world_size // 2
    top = base_port + (world_size - 1) * PORT_STRIDE + 1
    if not (0 < base_port and top < 65536):
        raise ValueError(f"base_port {base_port}: ranks need ports up to {top} (base_port + rank * {PORT_STRIDE})")
    return [
        RankPlan(r, world_size, r % dp, dp, ptp if r < dp else dtp, r < dp, base_port + r * PORT_STRIDE)
        for r in range(world_size)
    ]


def colocated_plan(
    world_size: int, tp_size: int | None = None, base_port: int = BASE_PORT, devices: int | None = None
) -> list[RankPlan]:
    """The co-located strategy: one mode-null engine per rank (is_prefill = is_decode = both)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    tp = tp_size or 1
    return [RankPlan(r, world_size, r, world_size, tp, True, base_port + r * PORT_STRIDE) for r in range(world_size)]
