"""Tensor-parallel sharding of a Llama-family model (Megatron style).

Rank r of T holds KV heads [r*H//T, (r+1)*H//T) and the query heads of those groups
(column-parallel q/k/v and the matching input columns of o_proj), and a slice of the MLP's
intermediate dimension (column-parallel gate/up, row-parallel down). Each rank's o_proj and
down_proj produce partial sums that one all-reduce per projection adds up; embeddings, norms
and lm_head are replicated, so after each all-reduce every rank holds the same hidden state
and only rank 0 computes logits.

Heads need not divide evenly (SGLang requires T | H): SmolLM2-135M has 3 KV heads and this
box 2 cores, so tp 2 splits them 1 + 2. The KV pool of each rank holds its own heads, and
the PD transfer layer maps heads between ranks of different tp sizes with the same ranges
(pdserve/disagg/transfer/heads.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pdserve.model.config import ModelConfig

INTER_UNIT = 32  # intermediate slices stay multiples of the 4-bit weight group


def head_range(rank: int, tp_size: int, total_heads: int) -> tuple[int, int]:
    """Global heads [start, end) of `rank`: as even a split as `total_heads` allows."""
    if tp_size < 1 or total_heads < tp_size:
        raise ValueError(
            f"{total_heads} KV heads cannot be split over tp size {tp_size} (every rank needs at least one head)"
        )
    if not (0 <= rank < tp_size):
        raise ValueError(f"rank {rank} not in [0, {tp_size})")
    return rank * total_heads // tp_size, (rank + 1) * total_heads // tp_size


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int
    kv_heads: tuple[int, int]  # global KV heads of this rank
    q_heads: tuple[int, int]  # global query heads (the groups of those KV heads)
    inter: tuple[int, int]  # intermediate (MLP) columns

    @staticmethod
    def of(cfg: ModelConfig, rank: int, size: int) -> "TPShard":
        if size > cfg.num_kv_heads:
            raise ValueError(
                f"--tp-size {size}: the model has {cfg.num_kv_heads} KV heads and every "
                f"tensor-parallel rank needs at least one"
            )
        kv = head_range(rank, size, cfg.num_kv_heads)
        group = cfg.num_heads // cfg.num_kv_heads
        unit = INTER_UNIT if cfg.intermediate_size % INTER_UNIT == 0 else 1
        n = cfg.intermediate_size // unit
        inter = (rank * n // size * unit, (rank + 1) * n // size * unit)
        return TPShard(rank, size, kv, (kv[0] * group, kv[1] * group), inter)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config this rank's forward sees (its heads and MLP width; the rest unchanged)."""
        return replace(
            cfg,
            num_heads=self.q_heads[1] - self.q_heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.inter[1] - self.inter[0],
        )


_ROWS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # column-parallel: output rows split
_COLS = ("o_proj", "down_proj")  # row-parallel: input columns split (weights only)


def shard_dim(name: str) -> int | None:
    """The dimension along which tensor parallelism splits the HF-named weight `name`
    (0: rows, 1: columns); None when every rank holds all of it (embeddings, norms, lm_head)."""
    parts = name.split(".")
    proj = parts[-2] if len(parts) >= 2 else ""
    if proj in _ROWS:
        return 0
    if proj in _COLS and parts[-1] == "weight":
        return 1
    return None


def _proj_range(name: str, cfg: ModelConfig, shard: TPShard) -> tuple[int, int]:
    hd = cfg.head_dim
    proj = name.split(".")[-2]
    if proj in ("q_proj", "o_proj"):
        return shard.q_heads[0] * hd, shard.q_heads[1] * hd
    if proj in ("k_proj", "v_proj"):
        return shard.kv_heads[0] * hd, shard.kv_heads[1] * hd
    return shard.inter


def full_shape(name: str, local_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """The whole model's shape of weight `name`, from one rank's shape of it (`cfg`: the
    whole model's config)."""
    d = shard_dim(name)
    if d is None:
        return tuple(local_shape)
    out = list(local_shape)
    out[d] = _proj_range(name, cfg, TPShard.of(cfg, 0, 1))[1]
    return tuple(out)


def shard_state(state: dict[str, torch.Tensor], cfg: ModelConfig, shard: TPShard) -> dict[str, torch.Tensor]:
    """HF-named weights of this rank: row slices of q/k/v/gate/up (and their biases), column
    slices of o/down; everything else as is (replicated)."""
    if shard.size == 1:
        return state
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        d = shard_dim(name)
        if d is None:
            out[name] = t
        else:
            a, b = _proj_range(name, cfg, shard)
            out[name] = t[a:b] if d == 0 else t[:, a:b]
    return out


def gather_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The whole weight `name` from every rank's shard, in rank order (ranks hold contiguous,
    ordered ranges: the inverse of shard_state)."""
    d = shard_dim(name)
    if d is None or len(shards) == 1:
        return shards[0]
    return torch.cat(shards, dim=d)
