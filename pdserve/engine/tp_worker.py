"""A tensor-parallel rank other than 0 (started by pdserve.engine.tp.TPDriver).

`python -m pdserve.engine.tp_worker ARGS_JSON RANK BATCH_ADDR REPLY_ADDR CORES`

Loads its shard, reports "loaded", gets the pool size (and, in PD mode, the name of the
shared-memory segment rank 0 allocated its KV pool in) with "init", joins the gloo group and
the all-reduce segment, reports "ready", then runs the layers of every batch rank 0 sends,
and the weight and memory ops between them (tp_weights.py), until "stop" or until rank 0
goes away.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import torch
import zmq

from pdserve.config import ServerArgs

logger = logging.getLogger("pdserve.tp_worker")


def main() -> None:
    raw, rank, batch_addr, reply_addr, cores = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    from pdserve.engine.scheduler_process import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    parent = os.getppid()
    args = ServerArgs(**json.loads(raw))
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s [tp{rank}] %(levelname)s %(message)s")
    if cores:
        os.sched_setaffinity(0, [int(c) for c in cores.split(",")])
    torch.set_num_threads(args.num_threads or len(os.sched_getaffinity(0)))
    ctx = zmq.Context.instance()
    reply = ctx.socket(zmq.PUSH)
    reply.connect(reply_addr)
    batches = ctx.socket(zmq.PULL)
    batches.connect(batch_addr)

    def say(op: str, frames=(), **kw) -> None:
        reply.send_multipart([json.dumps({"op": op, "rank": rank, **kw}).encode(), *frames])

    try:
        serve(args, rank, batches, say, parent)
    except Exception as e:
        logger.exception("tensor-parallel rank %d failed", rank)
        say("error", message=f"{type(e).__name__}: {e}")
        reply.close(linger=2000)
        sys.exit(1)


def serve(args: ServerArgs, rank: int, batches, say, parent: int) -> None:
    from pdserve.engine.shm_segment import SegmentMaps
    from pdserve.engine.model_loading import load_model, prebuild_shapes
    from pdserve.engine.runner import ModelRunner, kv_pool_shape, prefault
    from pdserve.engine.rank_weights import RankWeights
    from pdserve.engine.tp import ShmAllReduce, decode_batch, decode_header, init_gloo, make_allreduce
    from pdserve.engine.tp_weights import WorkerWeights

    model = load_model(args, tp_rank=rank)
    prebuild_shapes(model, args)
    say("loaded")
    maps = SegmentMaps()
    init = decode_header(batches.recv())
    if init.op != "init":
        raise RuntimeError(f"expected init, got {init.op!r}")
    b = init.body
    num_pages = int(b["num_pages"])
    kv = (
        maps.get(b["kv_shm"], kv_pool_shape(model.config, num_pages, args.page_size), model.dtype)
        if b.get("kv_shm")
        else None
    )  # PD: rank 0 allocated this rank's pool in shared memory
    runner = ModelRunner(model, num_pages, args.page_size, kv, attention_backend=args.attention_backend)
    init_gloo(rank, args.tp_size, int(b["gloo_port"]))

    def check_alive() -> None:
        if os.getppid() != parent:
            raise RuntimeError("rank 0 went away")

    ar_buf = maps.get(b["allreduce_shm"], (ShmAllReduce.nbytes(args.tp_size),), torch.uint8)
    model.all_reduce = make_allreduce(ar_buf, rank, args.tp_size, check_alive)
    # weight sync and memory release (tp_weights.py): a pool in rank 0's shared memory is
    # released by rank 0, a private one here
    weights = WorkerWeights(RankWeights(model, rank, args.tp_size, [] if kv is not None else [runner.kv_data]), say)
    say("ready")
    if runner.lazy_pool:
        prefault(runner.kv_data)
    try:
        while True:
            if weights.joining:
                weights.poll()
            if not batches.poll(100 if weights.joining else 1000):
                check_alive()
                continue
            frames = batches.recv_multipart(copy=False)
            h = decode_header(frames[0].buffer)
            if h.op == "stop":
                return
            if h.op.startswith("w_"):
                weights.handle(h.op, h.body, [f.buffer for f in frames[1:]])
                continue
            if h.op != "forward":
                raise RuntimeError(f"unknown op {h.op!r}")
            batch = decode_batch(h, [f.buffer for f in frames[1:]])
            with torch.inference_mode():
                model.forward(batch, runner.attn)
    finally:
        weights.close()


if __name__ == "__main__":
    main()
