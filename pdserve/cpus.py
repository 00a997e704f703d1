"""Splitting this process's cores between servers (pdserve launch) or tensor-parallel ranks."""

from __future__ import annotations

import os


def split_cores(cores: list[int], n: int, share_when_short: bool = False) -> list[list[int]]:
    """n disjoint core sets as even as possible. With fewer cores than sets: one core each,
    round robin, or (share_when_short) every set gets all the cores."""
    if n <= len(cores):
        size, extra = divmod(len(cores), n)
        out, i = [], 0
        for k in range(n):
            step = size + (1 if k < extra else 0)
            out.append(cores[i : i + step])
            i += step
        return out
    if share_when_short:
        return [list(cores)] * n
    return [[cores[k % len(cores)]] for k in range(n)]


def my_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))
