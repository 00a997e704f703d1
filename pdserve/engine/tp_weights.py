"""A tensor-parallel worker's side of weight sync and memory release (issue #15).

Rank 0 (pdserve/engine/weights_control.py) decides; it sends each worker an op through
TPDriver.send_op, between forward batches, and collects one "done" answer per op:

    w_join      join the trainer's group as rank rank_offset + tp_rank (in the background:
                the answer comes when the group is built; batches keep running meanwhile)
    w_destroy   leave a group
    w_stage     get the update (broadcast, safetensors frame, checkpoint), check it, keep
                this rank's shards; w_commit applies them, w_discard drops them
    w_get       this rank's shard of one weight, as a raw byte frame
    w_release / w_resume   this rank's weights and (private) KV pool

Answers are a JSON header and raw byte frames: nothing is pickled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pdserve.engine.memory_release import parse_tags
from pdserve.engine.rank_weights import GroupSpec, RankWeights, join_group, load_safetensors
from pdserve.model.weight_update import weight_view

logger = logging.getLogger(__name__)

Say = Callable[..., None]  # say(op, frames=(...), **json fields)


class WorkerWeights:
    def __init__(self, rank: RankWeights, say: Say) -> None:
        self.rank = rank
        self.say = say
        self._joiner = ThreadPoolExecutor(1, thread_name_prefix="pdserve-weights-join")
        self._joining: dict[int, tuple[GroupSpec, Future]] = {}  # call -> (group, its join)

    @property
    def joining(self) -> bool:
        return bool(self._joining)

    def handle(self, op: str, body: dict, frames: list) -> None:
        call = int(body.get("call", 0))
        try:
            data, out_frames = self._run(op, body, frames, call)
        except (ValueError, TypeError, KeyError) as e:
            self._done(call, False, str(e), 400)
        except Exception as e:  # a failed collective, a file error: rank 0 reports it
            logger.exception("tensor-parallel rank %d: %s failed", self.rank.tp_rank, op)
            self._done(call, False, f"{type(e).__name__}: {e}", 500)
        else:
            if data is not _LATER:
                self._done(call, True, data=data, frames=out_frames)

    def poll(self) -> None:
        """Answer the joins that completed."""
        for call, (spec, fut) in list(self._joining.items()):
            if not fut.done():
                continue
            del self._joining[call]
            try:
                self.rank.groups[spec.group_name] = fut.result()
            except Exception as e:
                self._done(call, False, f"could not join group {spec.group_name!r}: {e}", 400)
            else:
                self._done(call, True)

    def close(self) -> None:
        self.rank.close()
        self._joiner.shutdown(wait=False, cancel_futures=True)

    def _done(self, call: int, ok: bool, message: str = "", status: int = 200, data: Any = None, frames=()) -> None:
        self.say("done", frames=frames, call=call, ok=ok, message=message, status=status, data=data)

    def _run(self, op: str, body: dict, frames: list, call: int) -> tuple[Any, tuple]:
        r = self.rank
        if op == "w_join":
            spec = GroupSpec(**body["spec"])
            self._joining[call] = (spec, self._joiner.submit(join_group, spec, r.tp_rank))
            return _LATER, ()
        if op == "w_destroy":
            r.groups.pop(body["group_name"], None)
            return None, ()
        if op == "w_stage":
            source = body["source"]
            if source == "distributed":
                named = r.receive_broadcast(
                    body["group_name"], body["names"], body["dtypes"], body["shapes"], body.get("load_format")
                )
            elif source == "tensor":
                named = load_safetensors(bytes(frames[0]))
            elif source == "disk":
                named = r.read_checkpoint(body["model_path"])
            else:
                raise ValueError(f"unknown update source {source!r}")
            r.stage(named)
            return None, ()
        if op == "w_commit":
            n, layers = r.commit()
            return {"num_weights": n, "layers": layers}, ()
        if op == "w_discard":
            r.discard()
            return None, ()
        if op == "w_get":
            t = weight_view(r.model, body["name"])[: int(body["truncate_size"])].float().contiguous()
            return {"shape": list(t.shape)}, (t.view(-1).view(torch.uint8).numpy(),)
        if op == "w_release":
            return r.release(parse_tags(body["tags"])), ()
        if op == "w_resume":
            return r.resume(parse_tags(body["tags"])), ()
        raise ValueError(f"unknown op {op!r}")


_LATER = object()  # answered later (w_join)
