"""The scheduler process's side of RL weight sync and memory release (issue #15).

Handles the typed calls of pdserve/messages.py (`WeightsReq`) between steps, so a forward
never runs while weights change. The rules:

- An update never mixes weights within one request: when requests are in flight it waits
  until they have finished (new requests are held meanwhile and start on the new weights);
  the front end aborts them first when the caller asked for `abort_all_requests`.
- An update is checked whole first (names, shapes, dtypes); a bad one changes nothing.
- After an update the prefix cache is flushed (`flush_cache`, default true): cached KV was
  computed by the old weights.
- Memory is released only with nothing in flight; while released, new requests fail with
  503 and a message saying to resume.
- `pause_generation` stops stepping (requests stay where they are); `continue_generation`
  resumes.

Collective groups: gloo on CPU. The engine joins the trainer's group as rank
`rank_offset` (+ its tensor-parallel rank, when tp ranks join: not yet, see docs/rl.md) over
a TCPStore the trainer (rank 0) hosts at master_address:master_port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch

from pdserve.engine.memory_release import MemoryReleaser, parse_tags
from pdserve.messages import (
    AdminResp,
    ContinueGenerationReq,
    DestroyWeightsGroupReq,
    GetWeightsByNameReq,
    InitWeightsGroupReq,
    PauseGenerationReq,
    ReleaseMemoryReq,
    ResumeMemoryReq,
    UpdateWeightsFromDiskReq,
    UpdateWeightsFromDistributedReq,
    UpdateWeightsFromTensorReq,
    WeightsReq,
)
from pdserve.model.llama import LlamaModel
from pdserve.model.weight_update import apply_named_weights, check_named_weights, parse_dtype, weight_rows

logger = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(seconds=120)  # one collective: a trainer gone mid-update frees the engine after this
JOIN_TIMEOUT = timedelta(seconds=60)  # reaching the trainer's store and the other ranks
UPDATES = (UpdateWeightsFromDistributedReq, UpdateWeightsFromTensorReq, UpdateWeightsFromDiskReq)


class WeightsControl:
    """Owned by the scheduler process. `busy()`: requests in flight (scheduler or PD queues);
    `flush_cache()`: empty the prefix cache (False while requests run)."""

    def __init__(
        self,
        model: LlamaModel,
        kv_pools: list[torch.Tensor],
        tp_size: int,
        busy: Callable[[], bool],
        flush_cache: Callable[[], bool],
        reply: Callable[[AdminResp], None],
        weights_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.model = model
        self.weights_changed = weights_changed  # e.g. stop using a KV store keyed by the old weights
        self.tp_size = tp_size
        self.busy = busy
        self.flush_cache = flush_cache
        self.reply = reply
        self.groups: dict[str, Any] = {}
        # groups being joined, off the scheduler's thread (a trainer that is slow to come
        # must not stop serving): name -> (the call, its future)
        self._joining: dict[str, tuple[InitWeightsGroupReq, Future]] = {}
        self._joiner = ThreadPoolExecutor(1, thread_name_prefix="pdserve-weights-join")
        self.paused = False
        self.deferred: WeightsReq | None = None  # an update waiting for requests to finish
        self.memory = MemoryReleaser(
            self._weight_tensors,
            [t for t in kv_pools if t is not None],
            drop_derived=self._drop_derived,
            rebuild_derived=self._rebuild_derived,
        )

    # ---- what the scheduler process asks --------------------------------------------------
    def holds_new_requests(self) -> bool:
        """New requests wait (outside the scheduler) while an update waits to apply."""
        return self.deferred is not None

    def released_message(self) -> str | None:
        if self.memory.released:
            tags = ", ".join(sorted(t.value for t in self.memory.released))
            return f"the server's memory is released ({tags}); call /resume_memory_occupation first"
        return None

    def poll(self) -> bool:
        """Answer group joins that completed; apply a deferred update once nothing is in
        flight. True when an update was applied."""
        for name, (msg, fut) in list(self._joining.items()):
            if fut.done():
                del self._joining[name]
                try:
                    self.groups[name] = fut.result()
                except Exception as e:  # unreachable store, a rank that never came
                    self.reply(
                        AdminResp(
                            msg.call_id,
                            False,
                            f"could not join group {name!r} at {msg.master_address}:{msg.master_port}: {e}",
                            400,
                        )
                    )
                    continue
                logger.info("joined weights update group %r as rank %d of %d", name, msg.rank_offset, msg.world_size)
                self._ok(msg, f"joined group {name!r} as rank {msg.rank_offset}")
        if self.deferred is None or self.busy():
            return False
        msg, self.deferred = self.deferred, None
        self._update(msg)
        return True

    def handle(self, msg: WeightsReq) -> None:
        try:
            if self.tp_size > 1 and not isinstance(msg, (PauseGenerationReq, ContinueGenerationReq)):
                raise _Refused("weight sync and memory release are not supported with --tp-size > 1 yet", 501)
            if isinstance(msg, UPDATES):
                if self.deferred is not None:
                    raise _Refused("another weight update is waiting for requests to finish", 409)
                if self.memory.released:
                    raise _Refused(self.released_message(), 409)
                if self.busy():
                    if self.paused:
                        raise _Refused(
                            "requests are paused in flight: /continue_generation first, "
                            "or update with abort_all_requests",
                            409,
                        )
                    self.deferred = msg
                    logger.info("weight update waits for the requests in flight to finish")
                    return
                self._update(msg)
            elif isinstance(msg, GetWeightsByNameReq):
                self._ok(msg, data=weight_rows(self.model, msg.name, max(0, msg.truncate_size)))
            elif isinstance(msg, InitWeightsGroupReq):
                self._init_group(msg)
            elif isinstance(msg, DestroyWeightsGroupReq):
                if self.groups.pop(msg.group_name, None) is None:
                    raise _Refused(f"no weights update group {msg.group_name!r}", 400)
                self._ok(msg, f"group {msg.group_name!r} destroyed")
            elif isinstance(msg, ReleaseMemoryReq):
                self._release(msg)
            elif isinstance(msg, ResumeMemoryReq):
                info = self.memory.resume(parse_tags(msg.tags))
                self._ok(msg, "memory resumed", data=info)
            elif isinstance(msg, PauseGenerationReq):
                self.paused = True
                self._ok(msg, "generation paused")
            elif isinstance(msg, ContinueGenerationReq):
                self.paused = False
                self._ok(msg, "generation continued")
        except _Refused as e:
            self.reply(AdminResp(msg.call_id, False, str(e), e.status_code))
        except (ValueError, TypeError, KeyError) as e:
            self.reply(AdminResp(msg.call_id, False, str(e), 400))
        except Exception as e:  # a failed collective, a file error: the client hears of it
            logger.exception("weights/memory call failed")
            self.reply(AdminResp(msg.call_id, False, f"{type(e).__name__}: {e}", 500))

    def close(self) -> None:
        self.memory.close()
        self._joiner.shutdown(wait=False, cancel_futures=True)

    # ---- calls ----------------------------------------------------------------------------
    def _ok(self, msg: WeightsReq, message: str = "", data: Any = None) -> None:
        self.reply(AdminResp(msg.call_id, True, message, 200, data))

    def _update(self, msg: WeightsReq) -> None:
        try:
            if isinstance(msg, UpdateWeightsFromDistributedReq):
                named = self._receive_broadcast(msg)
            elif isinstance(msg, UpdateWeightsFromTensorReq):
                from safetensors.torch import load as load_safetensors

                try:
                    named = load_safetensors(bytes(msg.safetensors))
                except Exception as e:  # safetensors raises its own error types
                    raise ValueError(f"serialized_named_tensors is not a safetensors file: {e}") from None
            else:
                named = self._read_checkpoint(msg.model_path)
            layers = apply_named_weights(self.model, named)
            self.weights_changed()
            flushed = self.flush_cache() if msg.flush_cache else False
            logger.info(
                "updated %d weights (%d layers)%s", len(named), layers, ", prefix cache flushed" if flushed else ""
            )
            self._ok(msg, f"updated {len(named)} weights", data={"num_weights": len(named), "cache_flushed": flushed})
        except (ValueError, TypeError, KeyError) as e:
            self.reply(AdminResp(msg.call_id, False, f"weights not updated: {e}", 400))
        except Exception as e:
            logger.exception("weight update failed")
            self.reply(AdminResp(msg.call_id, False, f"weights not updated: {type(e).__name__}: {e}", 500))

    def _read_checkpoint(self, path: str) -> dict[str, torch.Tensor]:
        from pdserve.model.loader import load_model_files
        from pdserve.model.paths import resolve_model_path

        if not isinstance(path, str) or not path:
            raise ValueError("model_path must be a non-empty string")
        try:
            config, state = load_model_files(resolve_model_path(path))
        except Exception as e:  # not there, not a model, a broken file: the caller's input
            raise ValueError(f"cannot read model_path {path!r}: {type(e).__name__}: {e}") from None
        mine = self.model.config
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(config, k) != getattr(mine, k):
                raise ValueError(
                    f"model_path {path!r} is another architecture ({k} {getattr(config, k)} != {getattr(mine, k)})"
                )
        return state

    def _init_group(self, msg: InitWeightsGroupReq) -> None:
        if msg.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {msg.backend!r}")
        if msg.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs GPUs; this engine runs on CPU: use 'gloo'")
        if msg.group_name in self.groups or msg.group_name in self._joining:
            raise _Refused(f"weights update group {msg.group_name!r} exists; destroy it first", 409)
        if not (0 < msg.rank_offset < msg.world_size):  # + tp rank, once tp ranks join
            raise ValueError(
                f"rank_offset {msg.rank_offset} must be in 1..world_size-1 "
                f"(world_size {msg.world_size}; the trainer is rank 0)"
            )
        if not (0 < msg.master_port < 65536):
            raise ValueError("master_port must be in 1..65535")
        self._joining[msg.group_name] = (msg, self._joiner.submit(_join_group, msg))

    def _receive_broadcast(self, msg: UpdateWeightsFromDistributedReq) -> dict[str, torch.Tensor]:
        if not (len(msg.names) == len(msg.dtypes) == len(msg.shapes)):
            raise ValueError("names, dtypes and shapes must have the same length")
        dtypes = [parse_dtype(d) for d in msg.dtypes]
        shapes = [tuple(int(x) for x in s) for s in msg.shapes]
        entry = self.groups.get(msg.group_name)
        if entry is None:
            raise ValueError(f"no weights update group {msg.group_name!r}: call /init_weights_update_group first")
        group = entry[0]
        # the trainer broadcasts whatever we say; receive it all (a peer that stops midway
        # leaves the trainer hanging), then reject it whole if a name or shape is wrong
        if msg.load_format == "flattened_bucket":
            sizes = [torch.Size(s).numel() * d.itemsize for s, d in zip(shapes, dtypes)]
            flat = torch.empty(sum(sizes), dtype=torch.uint8)
            group.broadcast(flat, 0).wait()
            named, off = {}, 0
            for name, shape, dt, size in zip(msg.names, shapes, dtypes, sizes):
                named[name] = flat[off : off + size].view(dt).view(shape)
                off += size
        elif msg.load_format is None:
            named = {}
            for name, shape, dt in zip(msg.names, shapes, dtypes):
                t = torch.empty(shape, dtype=dt)
                group.broadcast(t, 0).wait()
                named[name] = t
        else:
            raise ValueError(f"load_format must be null or 'flattened_bucket', got {msg.load_format!r}")
        check_named_weights(self.model, dict(zip(msg.names, shapes)))
        return named

    def _release(self, msg: ReleaseMemoryReq) -> None:
        tags = parse_tags(msg.tags)
        if self.busy():
            raise _Refused("requests are in flight: release memory once they have finished", 409)
        if any(t.value == "kv_cache" for t in tags) and not self.flush_cache():
            raise _Refused("the prefix cache could not be flushed: requests are running", 409)
        info = self.memory.release(tags)
        self._ok(msg, f"released {info['bytes_released'] / 2**20:.0f} MiB", data=info)

    def _weight_tensors(self) -> list[torch.Tensor]:
        """The plain weights (what is spooled); the derived copies are dropped and rebuilt."""
        return list(self.model.named_weights().values())

    def _drop_derived(self) -> None:
        m = self.model
        m.lm_head_packed = None
        for layer in m.layers:
            layer.packed = {n: None for n in (layer.packed or {})}
            if layer.q4 is not None:
                layer.q4 = {}
            if layer.q8 is not None:
                layer.q8 = {}
        import gc

        gc.collect()

    def _rebuild_derived(self) -> None:
        from pdserve.model.llama import pack_weight
        from pdserve.model.weight_update import refresh_layer

        m = self.model
        for i in range(len(m.layers)):
            refresh_layer(m, i)
        if m.computes_logits:
            m.lm_head_packed = pack_weight(m.lm_head)


def _join_group(msg: InitWeightsGroupReq) -> tuple[Any, Any]:
    """Connect to the trainer's TCPStore and build the gloo group (blocks until every rank
    has joined). Runs on the joiner thread."""
    import torch.distributed as dist

    store = dist.TCPStore(msg.master_address, int(msg.master_port), is_master=False, timeout=JOIN_TIMEOUT)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = GROUP_TIMEOUT
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    group = dist.ProcessGroupGloo(dist.PrefixStore(msg.group_name, store), msg.rank_offset, msg.world_size, opts)
    return group, store


class _Refused(Exception):
    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
