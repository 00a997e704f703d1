"""One tensor-parallel rank's part of RL weight sync and memory release (issue #15).

Every rank of an instance holds one: rank 0 inside the scheduler process
(pdserve/engine/weights_control.py, which decides and answers), ranks 1..T-1 inside their
worker process (pdserve/engine/tp_weights.py, which runs what rank 0 sends). Each rank

- joins the trainer's collective group itself, as rank `rank_offset + tp_rank` (SGLang's and
  slime's numbering, so engines of different tp sizes share one group);
- gets every update whole (a broadcast, a safetensors file, a checkpoint: the whole model's
  tensors by Hugging Face name), checks it against the whole model's shapes, cuts its own
  shard (pdserve.model.tp.shard_state) and stages it; rank 0 commits only when every rank
  staged, so a bad update changes no rank;
- releases and resumes its own weights and KV pool (pdserve/engine/memory_release.py).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from pdserve.engine.memory_release import MemoryReleaser, MemoryTag
from pdserve.model.llama import LlamaModel
from pdserve.model.tp import TPShard, shard_state
from pdserve.model.weight_update import apply_named_weights, check_float, check_named_weights, parse_dtype

logger = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(seconds=120)  # one collective: a trainer gone mid-update frees the engine after this
JOIN_TIMEOUT = timedelta(seconds=60)  # reaching the trainer's store and the other ranks
LOAD_FORMATS = (None, "flattened_bucket")


@dataclass(frozen=True)
class GroupSpec:
    """A trainer's collective group, as /init_weights_update_group names it."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str = "gloo"

    def check(self, tp_size: int) -> None:
        """ValueError unless every tp rank of this engine gets a rank in the group."""
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if self.backend == "nccl":
            # the engine's weights live in CPU memory; NCCL moves device tensors only
            if not torch.cuda.is_available():
                raise ValueError("backend 'nccl' needs GPUs and there are none here; use 'gloo' (CPU)")
            raise ValueError(
                "backend 'nccl' is not supported yet: pdserve's engines hold their weights in CPU "
                "memory; use 'gloo' (the trainer broadcasts CPU copies)"
            )
        if not (0 < self.rank_offset and self.rank_offset + tp_size <= self.world_size):
            raise ValueError(
                f"rank_offset {self.rank_offset} with tp size {tp_size} needs ranks "
                f"{self.rank_offset}..{self.rank_offset + tp_size - 1} in 1..world_size-1 "
                f"(world_size {self.world_size}; the trainer is rank 0)"
            )
        if not (0 < self.master_port < 65536):
            raise ValueError("master_port must be in 1..65535")


def join_group(spec: GroupSpec, tp_rank: int) -> tuple[Any, Any]:
    """Connect to the trainer's TCPStore and build the gloo group as rank rank_offset +
    tp_rank (blocks until every rank has joined; callers run it off their main thread)."""
    import torch.distributed as dist

    store = dist.TCPStore(spec.master_address, int(spec.master_port), is_master=False, timeout=JOIN_TIMEOUT)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = GROUP_TIMEOUT
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    group = dist.ProcessGroupGloo(
        dist.PrefixStore(spec.group_name, store), spec.rank_offset + tp_rank, spec.world_size, opts
    )
    return group, store


def check_broadcast(names: list[str], dtypes: list[str], shapes: list[list[int]], load_format: str | None) -> None:
    """What must hold before any rank starts receiving (a receiver that gives up midway
    leaves the trainer hanging)."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError("names, dtypes and shapes must have the same length")
    for d in dtypes:
        parse_dtype(d)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be null or 'flattened_bucket', got {load_format!r}")


def load_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"serialized_named_tensors is not a safetensors file: {e}") from None


class RankWeights:
    """One rank's weights, groups and memory (see the module's doc)."""

    def __init__(self, model: LlamaModel, tp_rank: int, tp_size: int, kv_tensors: list[torch.Tensor]) -> None:
        self.model = model
        self.tp_rank = tp_rank
        self.shard = TPShard.of(model.full_config, tp_rank, tp_size)
        self.groups: dict[str, tuple[Any, Any]] = {}  # name -> (group, store)
        self.staged: dict[str, torch.Tensor] | None = None  # this rank's shards of a checked update
        self.memory = MemoryReleaser(
            lambda: list(model.named_weights().values()),
            [t for t in kv_tensors if t is not None],
            drop_derived=self._drop_derived,
            rebuild_derived=self._rebuild_derived,
        )

    # ---- sources: the whole model's tensors by HF name ------------------------------------
    def receive_broadcast(
        self, group_name: str, names: list[str], dtypes: list[str], shapes: list[list[int]], load_format: str | None
    ) -> dict[str, torch.Tensor]:
        """Receive what the trainer (group rank 0) broadcasts: one tensor per name, or all in
        one flat uint8 bucket. All of it is received even when a name or shape is wrong (the
        trainer would hang otherwise); `stage` rejects it afterwards."""
        check_broadcast(names, dtypes, shapes, load_format)
        entry = self.groups.get(group_name)
        if entry is None:
            raise ValueError(f"no weights update group {group_name!r}: call /init_weights_update_group first")
        group = entry[0]
        dts = [parse_dtype(d) for d in dtypes]
        sizes = [tuple(int(x) for x in s) for s in shapes]
        named: dict[str, torch.Tensor] = {}
        if load_format == "flattened_bucket":
            nbytes = [torch.Size(s).numel() * d.itemsize for s, d in zip(sizes, dts)]
            flat = torch.empty(sum(nbytes), dtype=torch.uint8)
            group.broadcast(flat, 0).wait()
            off = 0
            for name, shape, dt, n in zip(names, sizes, dts, nbytes):
                named[name] = flat[off : off + n].view(dt).view(shape)
                off += n
        else:
            for name, shape, dt in zip(names, sizes, dts):
                t = torch.empty(shape, dtype=dt)
                group.broadcast(t, 0).wait()
                named[name] = t
        return named

    def read_checkpoint(self, path: str) -> dict[str, torch.Tensor]:
        from pdserve.model.loader import load_model_files
        from pdserve.model.paths import resolve_model_path

        if not isinstance(path, str) or not path:
            raise ValueError("model_path must be a non-empty string")
        try:
            config, state = load_model_files(resolve_model_path(path))
        except Exception as e:  # not there, not a model, a broken file: the caller's input
            raise ValueError(f"cannot read model_path {path!r}: {type(e).__name__}: {e}") from None
        mine = self.model.full_config
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(config, k) != getattr(mine, k):
                raise ValueError(
                    f"model_path {path!r} is another architecture ({k} {getattr(config, k)} != {getattr(mine, k)})"
                )
        return state

    # ---- an update in two phases ----------------------------------------------------------
    def stage(self, named: dict[str, torch.Tensor]) -> None:
        """Check the whole tensors (float, known names, the whole model's shapes) and keep
        this rank's shards of them; changes no weight."""
        self.staged = None
        check_float(named)
        check_named_weights(self.model, {n: tuple(t.shape) for n, t in named.items()})
        self.staged = shard_state(named, self.model.full_config, self.shard)

    def commit(self) -> tuple[int, int]:
        """Apply the staged update. Returns (weights, layers rebuilt)."""
        if self.staged is None:
            raise RuntimeError("no staged weight update to commit")
        staged, self.staged = self.staged, None
        return len(staged), apply_named_weights(self.model, staged)

    def discard(self) -> None:
        self.staged = None

    # ---- memory ---------------------------------------------------------------------------
    def release(self, tags: list[MemoryTag]) -> dict[str, float]:
        return self.memory.release(tags)

    def resume(self, tags: list[MemoryTag]) -> dict[str, float]:
        return self.memory.resume(tags)

    def close(self) -> None:
        self.memory.close()

    def _drop_derived(self) -> None:
        """oneDNN's prepacked copies (opaque tensors: nothing to spool), the int8 and 4-bit grids."""
        m = self.model
        m.lm_head_packed = None
        m.lm_head_grid = None
        for layer in m.layers:
            layer.packed = {n: None for n in (layer.packed or {})}
            if layer.q4 is not None:
                layer.q4 = {}
            if layer.q8 is not None:
                layer.q8 = {}
        gc.collect()

    def _rebuild_derived(self) -> None:
        from pdserve.model.weight_update import refresh_layer

        m = self.model
        for i in range(len(m.layers)):
            refresh_layer(m, i)
        m.derive_head()
