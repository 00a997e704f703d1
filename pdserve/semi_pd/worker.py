"""A Semi-PD worker process (prefill or decode), started by the resident process.

`python -m pdserve.semi_pd.worker ARGS_JSON ROLE BATCH_ADDR REPLY_ADDR KV_SHM NUM_PAGES`

It maps the resident's weights and KV pool (shared-memory segments: zero copy; the prefill
worker's KV writes are the decode worker's reads; semi_pd/shared_weights.py), packs its own
oneDNN copies of the weights, reports "ready", then runs the
forward of every batch the resident sends (the tensor-parallel wire format of
engine/tp.py: msgpack header + raw tensor frames, no pickle) and answers with the logits
as raw float32 bytes. The op "pin" changes its compute share in place (cores, threads,
CFS quota: semi_pd/cpu_share.py). It exits on "stop" or when the resident goes away.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import torch
import zmq

from pdserve.config import ServerArgs

logger = logging.getLogger("pdserve.semi_pd.worker")


def main() -> None:
    raw, role, batch_addr, reply_addr, kv_shm, num_pages = sys.argv[1:7]
    from pdserve.engine.scheduler_process import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    parent = os.getppid()
    args = ServerArgs(**json.loads(raw))
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s [{role}] %(levelname)s %(message)s")
    ctx = zmq.Context.instance()
    reply = ctx.socket(zmq.PUSH)
    reply.connect(reply_addr)
    batches = ctx.socket(zmq.PULL)
    batches.connect(batch_addr)

    def say(op: str, **kw) -> None:
        reply.send_multipart([json.dumps({"op": op, "role": role, **kw}).encode()])

    try:
        serve(args, kv_shm, int(num_pages), batches, reply, say, parent)
    except Exception as e:
        logger.exception("Semi-PD %s worker failed", role)
        say("error", message=f"{type(e).__name__}: {e}")
        reply.close(linger=2000)
        sys.exit(1)


def serve(args: ServerArgs, kv_shm: str, num_pages: int, batches, reply, say, parent: int) -> None:
    from pdserve.engine.shm_segment import SegmentMaps
    from pdserve.engine.model_loading import prebuild_shapes, resolve_dtype
    from pdserve.engine.runner import ModelRunner, kv_pool_shape
    from pdserve.engine.tp import decode_batch, decode_header
    from pdserve.enums import Quantization
    from pdserve.model.config import ModelConfig
    from pdserve.model.llama import LlamaModel
    from pdserve.semi_pd.cpu_share import apply_share_to_self
    from pdserve.semi_pd.shared_weights import import_weights

    init = decode_header(batches.recv())  # the resident's weights: segment + manifest
    if init.op != "init":
        raise RuntimeError(f"expected init, got {init.op!r}")
    b = init.body
    cfg = ModelConfig(**{**b["config"], "eos_token_ids": tuple(b["config"]["eos_token_ids"])})
    model = LlamaModel(
        cfg,
        resolve_dtype(args.dtype),
        args.w4_decode_max_tokens,
        int8_linears=args.quantization == Quantization.W8A8_INT8,
    )
    maps = SegmentMaps()
    model.adopt_weights(import_weights(b["weights_shm"], int(b["weights_bytes"]), b["manifest"], maps))
    prebuild_shapes(model, args)  # as the scheduler process does: RSS stays flat while serving (#10)
    kv = maps.get(kv_shm, kv_pool_shape(model.config, num_pages, args.page_size), model.dtype)
    runner = ModelRunner(model, num_pages, args.page_size, kv, attention_backend=args.attention_backend)
    say("ready", pid=os.getpid())
    while True:
        if not batches.poll(1000):
            if os.getppid() != parent:
                raise RuntimeError("the resident process went away")
            continue
        frames = batches.recv_multipart(copy=False)
        h = decode_header(frames[0].buffer)
        if h.op == "stop":
            return
        if h.op == "pin":
            apply_share_to_self(h.body)
            say("pinned", threads=torch.get_num_threads())
            continue
        if h.op != "forward":
            raise RuntimeError(f"unknown op {h.op!r}")
        fb = decode_batch(h, [f.buffer for f in frames[1:]])
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model.forward(fb, runner.attn)  # [N, vocab] float32
        dt = time.perf_counter() - t0
        logits = logits.contiguous()
        head = json.dumps({"op": "logits", "shape": list(logits.shape), "seconds": dt}).encode()
        reply.send_multipart([head, logits.view(-1).numpy()], copy=False)


if __name__ == "__main__":
    main()
