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

With --tp-size > 1 every call reaches every rank: this process is rank 0 and sends ranks
1..T-1 the same call through TPDriver (pdserve/engine/tp_weights.py runs it there). An
update goes in two phases: every rank gets and checks it (stage), then all commit, or all
discard when any rank refused it, so no rank is left on other weights than the rest.

Collective groups: gloo on CPU (NCCL needs GPUs: a clear 400 here). Each rank joins the
trainer's group as rank `rank_offset + tp_rank` over a TCPStore the trainer (rank 0) hosts
at master_address:master_port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import torch

from pdserve.engine.memory_release import parse_tags
from pdserve.engine.rank_weights import GroupSpec, RankWeights, check_broadcast, join_group, load_safetensors
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
from pdserve.model.tp import gather_shards, shard_dim
from pdserve.model.weight_update import weight_view

logger = logging.getLogger(__name__)

UPDATES = (UpdateWeightsFromDistributedReq, UpdateWeightsFromTensorReq, UpdateWeightsFromDiskReq)


class WeightsControl:
    """Owned by the scheduler process. `tp`: the TPDriver of ranks 1..T-1 (None with one
    rank); `busy()`: requests in flight (scheduler or PD queues); `flush_cache()`: empty the
    prefix cache (False while requests run)."""

    def __init__(
        self,
        model: LlamaModel,
        kv_pools: list[torch.Tensor],
        tp: Any,
        busy: Callable[[], bool],
        flush_cache: Callable[[], bool],
        reply: Callable[[AdminResp], None],
        weights_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.model = model
        self.weights_changed = weights_changed  # e.g. stop using a KV store keyed by the old weights
        self.tp = tp
        self.tp_size = 1 if tp is None else tp.size
        self.busy = busy
        self.flush_cache = flush_cache
        self.reply = reply
        # rank 0's own weights, groups and memory; in PD mode with tp > 1 kv_pools holds every
        # rank's pool (shared memory rank 0 allocated), released here for all of them
        self.rank = RankWeights(model, 0, self.tp_size, kv_pools)
        # groups being joined, off the scheduler's thread (a trainer that is slow to come
        # must not stop serving): name -> (the call, rank 0's join, the workers' call id)
        self._joining: dict[str, tuple[InitWeightsGroupReq, Future, int | None]] = {}
        self._joiner = ThreadPoolExecutor(1, thread_name_prefix="pdserve-weights-join")
        self.paused = False
        self.deferred: WeightsReq | None = None  # an update waiting for requests to finish

    @property
    def groups(self) -> dict[str, Any]:
        return self.rank.groups

    @property
    def memory(self):
        return self.rank.memory

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
        """Answer group joins that completed on every rank; apply a deferred update once
        nothing is in flight. True when an update was applied."""
        for name, (msg, fut, call) in list(self._joining.items()):
            if not fut.done():  # rank 0 first: poll_call hands the workers' answers out once
                continue
            try:
                workers = self.tp.poll_call(call) if call is not None else []
            except Exception as e:  # a rank died
                del self._joining[name]
                self.reply(AdminResp(msg.call_id, False, f"could not join group {name!r}: {e}", 500))
                continue
            if workers is None:
                continue
            del self._joining[name]
            errors = [f"tp rank {w['rank']}: {w['message']}" for w in workers if not w["ok"]]
            try:
                self.groups[name] = fut.result()
            except Exception as e:  # unreachable store, a rank that never came
                errors.insert(0, str(e))
            if errors:
                self._leave(name)
                where = f"{msg.master_address}:{msg.master_port}"
                self.reply(AdminResp(msg.call_id, False, f"could not join group {name!r} at {where}: {errors[0]}", 400))
                continue
            last = msg.rank_offset + self.tp_size - 1
            logger.info(
                "joined weights update group %r as ranks %d..%d of %d", name, msg.rank_offset, last, msg.world_size
            )
            self._ok(
                msg,
                f"joined group {name!r} as rank {msg.rank_offset}" + (f"..{last}" if last > msg.rank_offset else ""),
            )
        if self.deferred is None or self.busy():
            return False
        msg, self.deferred = self.deferred, None
        self._update(msg)
        return True

    def handle(self, msg: WeightsReq) -> None:
        try:
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
                self._ok(msg, data=self._weight_rows(msg.name, max(0, msg.truncate_size)))
            elif isinstance(msg, InitWeightsGroupReq):
                self._init_group(msg)
            elif isinstance(msg, DestroyWeightsGroupReq):
                if msg.group_name not in self.groups:
                    raise _Refused(f"no weights update group {msg.group_name!r}", 400)
                self._leave(msg.group_name)
                self._ok(msg, f"group {msg.group_name!r} destroyed")
            elif isinstance(msg, ReleaseMemoryReq):
                self._release(msg)
            elif isinstance(msg, ResumeMemoryReq):
                tags = parse_tags(msg.tags)
                self._ok(msg, "memory resumed", data=self._on_all_ranks("w_resume", self.rank.resume, tags))
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
        self.rank.close()
        self._joiner.shutdown(wait=False, cancel_futures=True)

    # ---- calls ----------------------------------------------------------------------------
    def _ok(self, msg: WeightsReq, message: str = "", data: Any = None) -> None:
        self.reply(AdminResp(msg.call_id, True, message, 200, data))

    def _send(self, op: str, frames_by_rank: list[tuple] | None = None, **body) -> int | None:
        """Send `op` to ranks 1..T-1; the call's id (None with one rank)."""
        return None if self.tp is None else self.tp.send_op(op, frames_by_rank, **body)

    def _collect(self, call: int | None) -> list[dict]:
        return [] if call is None else self.tp.collect(call)

    def _on_all_ranks(self, op: str, mine: Callable, tags) -> dict[str, Any]:
        """Release or resume on every rank; the bytes and seconds of each."""
        call = self._send(op, tags=[t.value for t in tags])
        try:
            infos = [mine(tags)]
        finally:
            workers = self._collect(call)
        for w in workers:
            if not w["ok"]:
                raise RuntimeError(f"tp rank {w['rank']}: {w['message']}")
            infos.append(w["data"])
        out: dict[str, Any] = {"seconds": max(i["seconds"] for i in infos)}
        if "bytes_released" in infos[0]:
            out["bytes_released"] = sum(i["bytes_released"] for i in infos)
        if len(infos) > 1:
            out["ranks"] = infos
        return out

    def _update(self, msg: WeightsReq) -> None:
        """Every rank gets and checks the update (stage); all commit only if all staged."""
        try:
            call, source = self._start_update(msg)
            errors: list[tuple[int, str]] = []
            try:
                self.rank.stage(source())
            except (ValueError, TypeError, KeyError) as e:
                errors.append((400, str(e)))
            except Exception as e:  # a failed collective: the workers are still collected below
                errors.append((500, f"{type(e).__name__}: {e}"))
            for w in self._collect(call):
                if not w["ok"]:
                    errors.append((w["status"], f"tp rank {w['rank']}: {w['message']}"))
            if errors:
                self.rank.discard()
                self._collect(self._send("w_discard"))
                status, message = max(errors, key=lambda e: e[0] == 400)  # the caller's mistake first
                self.reply(AdminResp(msg.call_id, False, f"weights not updated: {message}", status))
                return
            commit = self._send("w_commit")
            n, layers = self.rank.commit()
            for w in self._collect(commit):
                if not w["ok"]:  # cannot happen after a stage (copies into checked views)
                    raise RuntimeError(f"tp rank {w['rank']} failed to commit: {w['message']}")
            self.weights_changed()
            flushed = self.flush_cache() if msg.flush_cache else False
            logger.info("updated %d weights (%d layers)%s", n, layers, ", prefix cache flushed" if flushed else "")
            self._ok(msg, f"updated {n} weights", data={"num_weights": n, "cache_flushed": flushed})
        except (ValueError, TypeError, KeyError) as e:
            self.reply(AdminResp(msg.call_id, False, f"weights not updated: {e}", 400))
        except Exception as e:
            logger.exception("weight update failed")
            self.reply(AdminResp(msg.call_id, False, f"weights not updated: {type(e).__name__}: {e}", 500))

    def _start_update(self, msg: WeightsReq) -> tuple[int | None, Callable[[], dict[str, torch.Tensor]]]:
        """Check what can be checked before any rank starts, send the workers their stage
        op, and return (its id, how rank 0 gets the whole tensors)."""
        if isinstance(msg, UpdateWeightsFromDistributedReq):
            check_broadcast(msg.names, msg.dtypes, msg.shapes, msg.load_format)
            if msg.group_name not in self.groups:
                raise ValueError(f"no weights update group {msg.group_name!r}: call /init_weights_update_group first")
            args = (msg.group_name, msg.names, msg.dtypes, msg.shapes, msg.load_format)
            call = self._send(
                "w_stage",
                source="distributed",
                group_name=msg.group_name,
                names=msg.names,
                dtypes=msg.dtypes,
                shapes=msg.shapes,
                load_format=msg.load_format,
            )
            return call, lambda: self.rank.receive_broadcast(*args)
        if isinstance(msg, UpdateWeightsFromTensorReq):
            files = msg.safetensors
            if len(files) not in (1, self.tp_size):
                raise ValueError(
                    f"serialized_named_tensors has {len(files)} entries: give one per tensor-parallel "
                    f"rank ({self.tp_size}) or one for all"
                )
            per_rank = [(files[r if len(files) > 1 else 0],) for r in range(1, self.tp_size)]
            call = self._send("w_stage", per_rank, source="tensor")
            return call, lambda: load_safetensors(files[0])
        call = self._send("w_stage", source="disk", model_path=msg.model_path)
        return call, lambda: self.rank.read_checkpoint(msg.model_path)

    def _weight_rows(self, name: str, truncate_size: int) -> list:
        """The first rows of the whole weight: the shards of every rank, put together."""
        mine = weight_view(self.model, name)[:truncate_size].float()
        if self.tp is None or shard_dim(name) is None:
            return mine.tolist()
        shards = [mine]
        for w in self._collect(self._send("w_get", name=name, truncate_size=truncate_size)):
            if not w["ok"]:
                raise RuntimeError(f"tp rank {w['rank']}: {w['message']}")
            raw = bytearray(w["frames"][0])
            shape = w["data"]["shape"]
            shards.append(torch.frombuffer(raw, dtype=torch.float32).view(shape) if raw else torch.empty(shape))
        return gather_shards(name, shards)[:truncate_size].tolist()

    def _init_group(self, msg: InitWeightsGroupReq) -> None:
        spec = GroupSpec(
            msg.master_address, msg.master_port, msg.rank_offset, msg.world_size, msg.group_name, msg.backend
        )
        spec.check(self.tp_size)
        if msg.group_name in self.groups or msg.group_name in self._joining:
            raise _Refused(f"weights update group {msg.group_name!r} exists; destroy it first", 409)
        call = self._send("w_join", spec=asdict(spec))
        self._joining[msg.group_name] = (msg, self._joiner.submit(join_group, spec, 0), call)

    def _leave(self, name: str) -> None:
        """Drop group `name` on every rank."""
        self.groups.pop(name, None)
        self._collect(self._send("w_destroy", group_name=name))

    def _release(self, msg: ReleaseMemoryReq) -> None:
        tags = parse_tags(msg.tags)
        if self.busy():
            raise _Refused("requests are in flight: release memory once they have finished", 409)
        if any(t.value == "kv_cache" for t in tags) and not self.flush_cache():
            raise _Refused("the prefix cache could not be flushed: requests are running", 409)
        info = self._on_all_ranks("w_release", self.rank.release, tags)
        self._ok(msg, f"released {info['bytes_released'] / 2**20:.0f} MiB", data=info)


class _Refused(Exception):
    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
